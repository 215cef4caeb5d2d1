"""A seeded synthetic ad marketplace whose click model is known exactly.

The CTR job needs traffic to score and a click log to train on, and a trained model is only
judged honestly against a ceiling: the true click probability of every request. This world
provides all three. Users and ads carry latent vectors and biases; a click happens with
``sigmoid(base + user bias + ad bias + user·ad + slot/device/hour effects + dense effects)``, so
:meth:`AdWorld.click_probability` is the best any model can do on the same requests.

Design choices, and why:

* **Counter-based randomness.** Every per-entity trait and every per-request draw is a hash
  (SplitMix64) of the seeds, a tag and an index, not the next value of a stateful generator. So
  a stream is the same whether it is cut into batches of 100 or of 50,000 (a Kafka producer and a
  training job see the same requests), and the traits of an id the world never built (a new user
  or ad) are still defined, which is what lets the ground truth score new ids.
* **Heavy tails where real traffic has them.** User activity and ad popularity are Zipf-like over
  random permutations of the ids; countries are skewed (~30 ISO codes); bid floors and session
  depths are log-normal. A model that only sees head ids, or a feature encoder that assumes
  uniform traffic, fails here the way it would in production.
* **Learnable, but not trivially.** Users' latents share a country component and ads' latents a
  campaign component, so coarse ids generalise to rare and unseen ones; ``user_ctr_7d`` and
  ``ad_ctr_7d`` are noisy daily estimates of the true propensities (noisier for ids with few
  impressions; 0 for new ids), not copies of them.
* **Vectorised throughout.** No Python loop runs per request (the Kafka producer streams from
  it at >200k requests/s); ids are formatted by Arrow kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from schemas.ad_requests import AD_REQUEST_SCHEMA, DENSE_RANGES, DEVICES, SLOTS
from transforms.errors import ConfigError

__all__ = ["COUNTRIES", "LATENT_DIM", "AdWorld", "RequestStream"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

#: Dimension of the users' and ads' latent vectors.
LATENT_DIM = 8

#: ISO 3166-1 alpha-2 codes, most traffic first (weights are Zipf-like over this order), with
#: each country's UTC offset in whole hours (for the user's local ``hour``) and its bid tier.
_COUNTRY_TABLE: tuple[tuple[str, int, int], ...] = (
    ("US", -5, 1), ("IN", 5, 3), ("BR", -3, 2), ("ID", 7, 3), ("GB", 0, 1), ("DE", 1, 1),
    ("FR", 1, 1), ("JP", 9, 1), ("MX", -6, 2), ("PH", 8, 3), ("TR", 3, 2), ("VN", 7, 3),
    ("IT", 1, 2), ("ES", 1, 2), ("CA", -5, 1), ("KR", 9, 1), ("TH", 7, 3), ("PL", 1, 2),
    ("NG", 1, 3), ("EG", 2, 3), ("AR", -3, 2), ("CO", -5, 3), ("SA", 3, 2), ("AU", 10, 1),
    ("NL", 1, 1), ("ZA", 2, 3), ("MY", 8, 2), ("SE", 1, 1), ("CL", -4, 2), ("PK", 5, 3),
)  # fmt: skip
COUNTRIES: tuple[str, ...] = tuple(c for c, _, _ in _COUNTRY_TABLE)
_TZ_HOURS = np.array([tz for _, tz, _ in _COUNTRY_TABLE], dtype=np.int64)
_TIER_BID_MULT = {1: 3.0, 2: 1.0, 3: 0.35}
_COUNTRY_BID_MULT = np.array([_TIER_BID_MULT[t] for _, _, t in _COUNTRY_TABLE])
_COUNTRY_ZIPF = 1.0

# Traffic mix and the true effects of the closed vocabularies (same order as SLOTS / DEVICES).
_SLOT_SHARE = np.array([0.40, 0.15, 0.12, 0.10, 0.08, 0.15])
_SLOT_EFFECT = np.array([0.0, -0.7, 0.6, -0.2, 0.3, 0.1])
_SLOT_BID_MULT = np.array([1.0, 0.5, 2.0, 1.2, 3.0, 1.0])
_DEVICE_SHARE = np.array([0.30, 0.45, 0.15, 0.06, 0.04])
_DEVICE_EFFECT = np.array([0.15, 0.0, -0.25, 0.05, -0.6])
_PREFERRED_DEVICE_P = 0.85
# Evening peak of the user's local day.
_HOUR_EFFECT = 0.3 * np.cos(2 * np.pi * (np.arange(24) - 21) / 24)

#: Intercept of the true logit, chosen so the overall click rate is ~3%.
_BASE_LOGIT = -4.5
_USER_BIAS_SD = 0.5
_AD_BIAS_SD = 0.35
_CAMPAIGN_BIAS_SD = 0.4
_COUNTRY_BIAS_SD = 0.25
# Per-component scale of the latents; with the country/campaign mixing below var(user·ad) ~ 0.6.
_LATENT_SCALE = 0.55
_BID_EFFECT = 0.2  # premium inventory clicks more: + 0.2 * log1p(bid floor)
_DEPTH_EFFECT = -0.12  # fatigue: - 0.12 * log1p(session depth)

_USER_ZIPF = 0.8
_AD_ZIPF = 1.0
_CAMPAIGN_ZIPF = 0.7
_USER_IMPRESSIONS_7D = 400.0  # mean; heavy users see thousands
_AD_IMPRESSIONS_7D = 2_000.0

_USER_PREFIX, _AD_PREFIX, _CAMPAIGN_PREFIX = "u", "a", "c"
_ENTITY_DIGITS = 12
_CAMPAIGN_DIGITS = 6
#: Ids of new (never-built) users/ads live in a block of 10M ids per stream (one of ~100k blocks,
#: chosen by the seeds), above every built id: a new id is never a built one, and two streams
#: share new ids only if their seeds pick the same block (about 1 pair in 100,000).
_NEW_BLOCK = 10_000_000
_NEW_BLOCKS = 99_999
_MAX_ENTITIES = _NEW_BLOCK

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
#: 2024-06-01T00:00:00Z: streams start here unless told otherwise, so timestamps never depend on "now".
DEFAULT_START_MS = 1_717_200_000_000

# --------------------------------------------------------------------------------------------------
# Counter-based randomness
# --------------------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(x: int) -> int:
    """SplitMix64's finaliser on a Python int (for keys)."""
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _key(*parts: int | str) -> int:
    """A 64-bit key for a named random quantity: independent for any change of any part."""
    k = 0x5EED
    for p in parts:
        v = int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") if isinstance(p, str) else p & _MASK
        k = _mix_int(k ^ v)
    return k


def _mix(x: U64) -> U64:
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash(key: int, idx: npt.NDArray[np.integer]) -> U64:
    with np.errstate(over="ignore"):
        return _mix(_mix(idx.astype(np.uint64) ^ np.uint64(key)))


def _uniform(key: int, idx: npt.NDArray[np.integer]) -> F64:
    """Uniform in [0, 1), one per index."""
    return (_hash(key, idx) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _normal(key: int, idx: npt.NDArray[np.integer]) -> F64:
    """Standard normal, one per index (Box-Muller over two hashed uniforms)."""
    u1 = 1.0 - _uniform(key, idx)  # (0, 1]: log is finite
    u2 = _uniform(_mix_int(key), idx)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _normals(key: int, idx: npt.NDArray[np.integer], dim: int) -> F64:
    """``[len(idx), dim]`` standard normals."""
    return np.stack([_normal(_mix_int(key ^ j), idx) for j in range(dim)], axis=1)


def _zipf_cdf(n: int, exponent: float) -> F64:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _pick(cdf: F64, u: F64) -> I64:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


def _sigmoid(x: F64) -> F64:
    return 1.0 / (1.0 + np.exp(-x))


def _format_ids(prefix: str, idx: I64, digits: int) -> pa.StringArray:
    """``prefix`` + zero-padded decimal, by Arrow kernels (no Python per id)."""
    text = pc.utf8_lpad(pc.cast(pa.array(idx, pa.int64()), pa.string()), width=digits, padding="0")
    return pc.binary_join_element_wise(prefix, text, "")


def _parse_ids(column: pa.Array | pa.ChunkedArray, prefix: str, what: str) -> I64:
    try:
        if not pc.all(pc.starts_with(column, prefix)).as_py():
            raise ValueError(f"not every id starts with {prefix!r}")
        return pc.cast(pc.utf8_slice_codeunits(column, len(prefix)), pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise ValueError(f"{what} ids were not produced by an AdWorld ({' '.join(str(exc).split())})") from exc


# --------------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Users:
    country: I64
    latent: F64
    bias: F64
    device: I64


@dataclass(frozen=True)
class _Ads:
    campaign: I64
    latent: F64
    bias: F64
    floor: F64


class AdWorld:
    """Users, ads, campaigns and countries with their hidden traits; build with :meth:`build`."""

    def __init__(self, seed: int, users: int, ads: int, campaigns: int) -> None:
        self.seed = seed
        self.n_users = users
        self.n_ads = ads
        self.n_campaigns = campaigns
        n_c = len(COUNTRIES)
        self._country_cdf = _zipf_cdf(n_c, _COUNTRY_ZIPF)
        self._country_latent = _normals(_key(seed, "c_lat"), np.arange(n_c), LATENT_DIM)
        self._country_bias = _COUNTRY_BIAS_SD * _normal(_key(seed, "c_bias"), np.arange(n_c))
        camp = np.arange(campaigns)
        self._campaign_cdf = _zipf_cdf(campaigns, _CAMPAIGN_ZIPF)
        self._campaign_latent = _normals(_key(seed, "k_lat"), camp, LATENT_DIM)
        self._campaign_bias = _CAMPAIGN_BIAS_SD * _normal(_key(seed, "k_bias"), camp)
        self._campaign_floor = np.exp(np.log(1.2) + 0.6 * _normal(_key(seed, "k_floor"), camp))

        self._users = self._user_traits(np.arange(users, dtype=np.int64))
        self._ads = self._ad_traits(np.arange(ads, dtype=np.int64))
        # Who is active and which ads win auctions: Zipf over a seeded permutation of the ids, so
        # activity is not correlated with the id number.
        rng = np.random.default_rng(_key(seed, "popularity"))
        user_rank = rng.permutation(users)
        ad_rank = rng.permutation(ads)
        self._user_cdf = np.cumsum((user_rank + 1.0) ** -_USER_ZIPF)
        self._user_cdf /= self._user_cdf[-1]
        self._ad_cdf = np.cumsum((ad_rank + 1.0) ** -_AD_ZIPF)
        self._ad_cdf /= self._ad_cdf[-1]
        user_share = np.diff(self._user_cdf, prepend=0.0)
        ad_share = np.diff(self._ad_cdf, prepend=0.0)
        # Last week's impressions, proportional to activity: how much data backs each *_ctr_7d.
        self._user_imps = np.maximum(1.0, np.round(_USER_IMPRESSIONS_7D * users * user_share))
        self._ad_imps = np.maximum(10.0, np.round(_AD_IMPRESSIONS_7D * ads * ad_share))

        self._user_ids = _format_ids(_USER_PREFIX, np.arange(users, dtype=np.int64), _ENTITY_DIGITS)
        self._ad_ids = _format_ids(_AD_PREFIX, np.arange(ads, dtype=np.int64), _ENTITY_DIGITS)
        self._campaign_ids = _format_ids(_CAMPAIGN_PREFIX, np.arange(campaigns, dtype=np.int64), _CAMPAIGN_DIGITS)
        self._slot_values = pa.array(SLOTS, pa.string())
        self._device_values = pa.array(DEVICES, pa.string())
        self._country_values = pa.array(COUNTRIES, pa.string())

    @classmethod
    def build(cls, seed: int = 7, *, users: int = 50_000, ads: int = 5_000, campaigns: int = 500) -> AdWorld:
        """The world for ``seed``: the same arguments always give the same world."""
        for name, value in (("users", users), ("ads", ads), ("campaigns", campaigns)):
            if not 1 <= value <= _MAX_ENTITIES:
                raise ConfigError(f"AdWorld {name} must be between 1 and {_MAX_ENTITIES:,}, not {value}")
        if seed < 0:
            raise ConfigError(f"AdWorld seed must be >= 0, not {seed}")
        return cls(seed, users, ads, campaigns)

    # --- hidden traits, defined for every id (built or new) ---------------------------------------

    def _user_traits(self, idx: I64) -> _Users:
        s = self.seed
        country = _pick(self._country_cdf, _uniform(_key(s, "u_country"), idx))
        own = _normals(_key(s, "u_lat"), idx, LATENT_DIM)
        latent = _LATENT_SCALE * (0.8 * self._country_latent[country] + 0.45 * own)
        bias = self._country_bias[country] + _USER_BIAS_SD * _normal(_key(s, "u_bias"), idx)
        device = _pick(np.cumsum(_DEVICE_SHARE) / _DEVICE_SHARE.sum(), _uniform(_key(s, "u_device"), idx))
        return _Users(country=country, latent=latent, bias=bias, device=device)

    def _ad_traits(self, idx: I64) -> _Ads:
        s = self.seed
        campaign = _pick(self._campaign_cdf, _uniform(_key(s, "a_campaign"), idx))
        own = _normals(_key(s, "a_lat"), idx, LATENT_DIM)
        latent = _LATENT_SCALE * (0.8 * self._campaign_latent[campaign] + 0.6 * own)
        bias = self._campaign_bias[campaign] + _AD_BIAS_SD * _normal(_key(s, "a_bias"), idx)
        floor = self._campaign_floor[campaign] * np.exp(0.3 * _normal(_key(s, "a_floor"), idx))
        return _Ads(campaign=campaign, latent=latent, bias=bias, floor=floor)

    def _users_at(self, idx: I64) -> _Users:
        """Traits of any user ids: built ones from the cache, new ones from their hashes."""
        known = idx < self.n_users
        u = self._users
        at = np.where(known, idx, 0)
        out = _Users(u.country[at], u.latent[at], u.bias[at], u.device[at])
        if not known.all():
            new = self._user_traits(idx[~known])
            out.country[~known], out.latent[~known] = new.country, new.latent
            out.bias[~known], out.device[~known] = new.bias, new.device
        return out

    def _ads_at(self, idx: I64) -> _Ads:
        """Traits of any ad ids: built ones from the cache, new ones from their hashes."""
        known = idx < self.n_ads
        a = self._ads
        at = np.where(known, idx, 0)
        out = _Ads(a.campaign[at], a.latent[at], a.bias[at], a.floor[at])
        if not known.all():
            new = self._ad_traits(idx[~known])
            out.campaign[~known], out.latent[~known] = new.campaign, new.latent
            out.bias[~known], out.floor[~known] = new.bias, new.floor
        return out

    # --- public API -------------------------------------------------------------------------------

    def requests(
        self,
        seed: int,
        *,
        start_time_ms: int | None = None,
        new_user_fraction: float = 0.02,
        new_ad_fraction: float = 0.01,
        rate_per_s: float = 10.0,
    ) -> RequestStream:
        """A stream of ad requests; the same ``seed`` (and world) always gives the same stream.

        ``rate_per_s`` is the mean request rate in event time (Poisson arrivals): at the default a
        million requests span ~28 hours, so every local hour and two days of ``*_ctr_7d`` occur.
        """
        if not 0.0 <= new_user_fraction <= 1.0 or not 0.0 <= new_ad_fraction <= 1.0:
            raise ConfigError(
                f"new_user_fraction and new_ad_fraction must be in [0, 1], not {new_user_fraction}, {new_ad_fraction}"
            )
        if not rate_per_s > 0:
            raise ConfigError(f"rate_per_s must be > 0, not {rate_per_s}")
        if seed < 0:
            raise ConfigError(f"request stream seed must be >= 0, not {seed}")
        start = DEFAULT_START_MS if start_time_ms is None else int(start_time_ms)
        return RequestStream(self, seed, start, new_user_fraction, new_ad_fraction, rate_per_s)

    def click_probability(self, batch: pa.RecordBatch | pa.Table) -> npt.NDArray[np.float64]:
        """The true p(click) of each request (ids must come from this world's streams)."""
        user = _parse_ids(batch.column("user_id"), _USER_PREFIX, "user")
        ad = _parse_ids(batch.column("ad_id"), _AD_PREFIX, "ad")
        slot = _closed_vocab(batch.column("slot"), self._slot_values, "slot")
        device = _closed_vocab(batch.column("device"), self._device_values, "device")
        hour = np.asarray(batch.column("hour").to_numpy(zero_copy_only=False), dtype=np.int64) % 24
        bid = np.asarray(batch.column("bid_floor_usd").to_numpy(zero_copy_only=False), dtype=np.float64)
        depth = np.asarray(batch.column("session_depth").to_numpy(zero_copy_only=False), dtype=np.float64)
        return self._probability(self._users_at(user), self._ads_at(ad), slot, device, hour, bid, depth)

    def _probability(self, users: _Users, ads: _Ads, slot: I64, device: I64, hour: I64, bid: F64, depth: F64) -> F64:
        logit = (
            _BASE_LOGIT
            + users.bias
            + ads.bias
            + np.einsum("ij,ij->i", users.latent, ads.latent)
            + _SLOT_EFFECT[slot]
            + _DEVICE_EFFECT[device]
            + _HOUR_EFFECT[hour]
            + _BID_EFFECT * np.log1p(np.clip(bid, 0.0, None))
            + _DEPTH_EFFECT * np.log1p(np.clip(depth, 0.0, None))
        )
        return _sigmoid(logit)

    def _user_propensity(self, users: _Users) -> F64:
        """A user's typical click rate: what an honest ``user_ctr_7d`` estimates."""
        return _sigmoid(_BASE_LOGIT + 0.35 + users.bias)

    def _ad_propensity(self, ads: _Ads) -> F64:
        """An ad's typical click rate: what an honest ``ad_ctr_7d`` estimates."""
        return _sigmoid(_BASE_LOGIT + 0.35 + ads.bias)


def _closed_vocab(column: pa.Array | pa.ChunkedArray, values: pa.Array, what: str) -> I64:
    idx = pc.index_in(column, value_set=values)
    if idx.null_count:
        raise ValueError(f"{what} has values outside {values.to_pylist()}")
    return np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)


class RequestStream:
    """Successive batches of one seeded request stream (see :meth:`AdWorld.requests`).

    Request ``k`` of the stream is a pure function of the seeds and ``k`` (plus, for ``seq`` and
    new-id numbering, of the requests before it), so batch boundaries never change the stream.
    A new user or ad is new for exactly one request: the next new one gets the next new id.
    """

    def __init__(
        self,
        world: AdWorld,
        seed: int,
        start_time_ms: int,
        new_user_fraction: float,
        new_ad_fraction: float,
        rate_per_s: float,
    ) -> None:
        self.world = world
        self.seed = seed
        self.new_user_fraction = new_user_fraction
        self.new_ad_fraction = new_ad_fraction
        self._k = _key(world.seed, seed, "stream")
        self._mean_gap_us = 1e6 / rate_per_s
        self._clock_us = int(start_time_ms) * 1000
        self._position = 0
        self._new_users = 0
        self._new_ads = 0
        self._seq = np.zeros(world.n_users, dtype=np.int64)
        block = 1 + _key(world.seed, seed, "new_block") % _NEW_BLOCKS
        self._new_user_base = _NEW_BLOCK * block
        self._new_ad_base = _NEW_BLOCK * block
        self._request_prefix = f"r{world.seed}-{seed}-"

    @property
    def position(self) -> int:
        """How many requests this stream has produced."""
        return self._position

    def _u(self, tag: str, r: I64) -> F64:
        return _uniform(_key(self._k, tag), r)

    def next_batch(self, n: int) -> pa.RecordBatch:
        """The next ``n`` requests, as a batch of exactly :data:`AD_REQUEST_SCHEMA`."""
        if n < 0:
            raise ValueError(f"batch size must be >= 0, not {n}")
        w = self.world
        r = np.arange(self._position, self._position + n, dtype=np.int64)

        # Who: known users by activity, or a brand-new user (never built, seq 0).
        new_user = self._u("new_user", r) < self.new_user_fraction
        user = _pick(w._user_cdf, self._u("user", r))
        n_new_users = int(new_user.sum())
        user[new_user] = self._new_user_base + self._new_users + np.arange(n_new_users)
        self._new_users += n_new_users
        seq = np.zeros(n, dtype=np.int64)
        known = ~new_user
        seq[known] = _running_count(user[known], self._seq)

        # What: an ad by popularity, or a new ad (of an existing campaign).
        new_ad = self._u("new_ad", r) < self.new_ad_fraction
        ad = _pick(w._ad_cdf, self._u("ad", r))
        n_new_ads = int(new_ad.sum())
        ad[new_ad] = self._new_ad_base + self._new_ads + np.arange(n_new_ads)
        self._new_ads += n_new_ads

        users = w._users_at(user)
        ads = w._ads_at(ad)

        # When: Poisson arrivals in whole microseconds (integer sums: exact across batch cuts).
        gaps = np.floor(-np.log1p(-self._u("gap", r)) * self._mean_gap_us).astype(np.int64)
        clock = self._clock_us + np.cumsum(gaps)
        if n:
            self._clock_us = int(clock[-1])
        time_ms = clock // 1000
        hour = (time_ms // _HOUR_MS + _TZ_HOURS[users.country]) % 24
        day = time_ms // _DAY_MS

        # Where and on what.
        slot = _pick(np.cumsum(_SLOT_SHARE) / _SLOT_SHARE.sum(), self._u("slot", r))
        other_device = _pick(np.cumsum(_DEVICE_SHARE) / _DEVICE_SHARE.sum(), self._u("device", r))
        device = np.where(self._u("device_pref", r) < _PREFERRED_DEVICE_P, users.device, other_device)

        # Dense features.
        lo_bid, hi_bid = DENSE_RANGES["bid_floor_usd"]
        bid = ads.floor * _COUNTRY_BID_MULT[users.country] * _SLOT_BID_MULT[slot]
        bid = bid * np.exp(0.25 * _normal(_key(self._k, "bid"), r))
        bid = np.clip(np.round(bid, 3), max(lo_bid, 0.001), hi_bid)
        lo_d, hi_d = DENSE_RANGES["session_depth"]
        depth = np.clip(np.floor(np.exp(1.2 + 1.0 * _normal(_key(self._k, "depth"), r))), lo_d, hi_d)
        user_imps = np.where(user < w.n_users, w._user_imps[np.minimum(user, w.n_users - 1)], 0.0)
        ad_imps = np.where(ad < w.n_ads, w._ad_imps[np.minimum(ad, w.n_ads - 1)], 0.0)
        user_ctr = _daily_ctr(w._user_propensity(users), user_imps, _key(w.seed, "u_ctr7d"), user, day)
        ad_ctr = _daily_ctr(w._ad_propensity(ads), ad_imps, _key(w.seed, "a_ctr7d"), ad, day)

        self._position += n
        user_ids = _entity_ids(w._user_ids, user, w.n_users, _USER_PREFIX)
        ad_ids = _entity_ids(w._ad_ids, ad, w.n_ads, _AD_PREFIX)
        columns = [
            _format_ids(self._request_prefix, r, _ENTITY_DIGITS),
            user_ids,
            pa.array(seq, pa.int64()),
            ad_ids,
            w._campaign_ids.take(pa.array(ads.campaign)),
            w._slot_values.take(pa.array(slot)),
            w._device_values.take(pa.array(device)),
            w._country_values.take(pa.array(users.country)),
            pa.array(hour.astype(np.int8), pa.int8()),
            pa.array(bid.astype(np.float32), pa.float32()),
            pa.array(user_ctr.astype(np.float32), pa.float32()),
            pa.array(ad_ctr.astype(np.float32), pa.float32()),
            pa.array(depth.astype(np.float32), pa.float32()),
            pa.array(time_ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=AD_REQUEST_SCHEMA)


def _running_count(keys: I64, counts: I64) -> I64:
    """For each position, how many times its key occurred before it (across calls); updates ``counts``."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, n])
    within = np.arange(n) - np.repeat(starts, sizes)
    out = np.empty(n, dtype=np.int64)
    out[order] = counts[sorted_keys] + within
    counts[sorted_keys[starts]] += sizes
    return out


def _daily_ctr(propensity: F64, impressions: F64, key: int, entity: I64, day: I64) -> F64:
    """Last week's observed CTR: the true propensity plus binomial-sized noise, redrawn daily
    (a batch job refreshes the feature once a day); 0 where there were no impressions."""
    with np.errstate(over="ignore"):
        cell = _mix(entity.astype(np.uint64)) ^ day.astype(np.uint64)
    z = _normal(key, cell)
    n = np.maximum(impressions, 1.0)
    ctr = propensity + z * np.sqrt(propensity * (1.0 - propensity) / n)
    ctr = np.round(np.clip(ctr, 0.0, 1.0) * n) / n  # a ratio of whole clicks to impressions
    return np.where(impressions > 0, ctr, 0.0)


def _entity_ids(known_ids: pa.StringArray, idx: I64, n_known: int, prefix: str) -> pa.Array:
    is_new = idx >= n_known
    if not is_new.any():
        return known_ids.take(pa.array(idx))
    return _format_ids(prefix, idx, _ENTITY_DIGITS)
