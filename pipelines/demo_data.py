"""The seeded sample items table that the README's first command creates.

Every test and benchmark of the embedding backfill reads a table made here, so three things matter
more than realism for its own sake:

* **Determinism.** The same ``seed`` (and ``id_offset``) gives the same table byte for byte, so a
  golden output or a benchmark number can be reproduced on another machine.
* **A heavy-tailed length distribution.** Real listings are mostly short with a long tail of
  spec-sheet monsters; that tail is what makes naive padding expensive and length bucketing
  worthwhile, so the benchmark's headline gain is only honest if the tail is here too.
  Word counts follow a lognormal: median ~20 words, p90 ~80, p99 ~300, capped at 600.
* **Poison rows on demand.** ``bad_fraction`` plants empty and null texts at seeded positions,
  so the quarantine path can be counted exactly (invariant 1 of DESIGN.md).

The Delta helpers import deltalake when called, so the generator alone runs where deltalake is not
installed (the GPU benchmark box takes only torch and the encoder's own needs). They enable Change
Data Feed because the backfill's incremental mode reads only the
rows changed since its last run, and ``mutate_items`` produces exactly such changes.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.items import ITEMS_SCHEMA
from transforms.errors import ConfigError, SinkError, SourceError

__all__ = [
    "CATEGORIES",
    "MutationSummary",
    "format_item_id",
    "generate_items",
    "mutate_items",
    "write_items_table",
]

#: Lognormal parameters of the *target* word count. Texts are built from whole sentences until the
#: target is reached, which adds roughly half a sentence, so the median of the result sits ~20.
_LEN_MEDIAN = 15.0
_LEN_SIGMA = 1.25
_LEN_MIN = 3
_LEN_MAX = 600

#: Items are stamped inside one year so timestamps are deterministic (never "now").
_BASE_TS_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
_YEAR_US = 365 * 86_400 * 1_000_000

_ID_PREFIX = "item-"
_ID_WIDTH = 7

_CDF_KEY = "delta.enableChangeDataFeed"


def format_item_id(n: int) -> str:
    """Ids are fixed-width strings so that lexical order equals numeric order in every engine."""
    return f"{_ID_PREFIX}{n:0{_ID_WIDTH}d}"


# --------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Category:
    slug: str
    noun: str
    price_median: float
    products: tuple[str, ...]
    materials: tuple[str, ...]
    features: tuple[str, ...]
    sizes: tuple[str, ...]
    uses: tuple[str, ...]
    accessories: tuple[str, ...]
    care: tuple[str, ...]


# fmt: off
_CATEGORY_DEFS: tuple[_Category, ...] = (
    _Category(
        slug="electronics",
        noun="consumer electronics",
        price_median=60.0,
        products=(
            "wireless earbuds", "bluetooth speaker", "USB-C charger", "power bank", "smartwatch",
            "mechanical keyboard", "gaming mouse", "noise-cancelling headphones", "4K webcam",
            "portable SSD", "e-reader", "action camera", "smart plug", "tablet stand", "HDMI cable",
            "soundbar", "wifi mesh router", "dash-mounted projector",
        ),
        materials=(
            "anodised aluminium", "ABS plastic", "tempered glass", "soft-touch silicone",
            "braided nylon", "magnesium alloy", "recycled polycarbonate",
        ),
        features=(
            "40-hour battery life", "fast charging over USB-C", "Bluetooth 5.3 with multipoint pairing",
            "IPX7 water resistance", "active noise cancellation", "a low-latency gaming mode",
            "a built-in microphone with echo cancellation", "auto-sleep to save power",
            "an LED charge indicator", "over-voltage and short-circuit protection",
            "hot-swappable switches", "a companion app with firmware updates", "wireless charging support",
        ),
        sizes=(
            "compact", "full-size", "standard edition", "pro edition", "twin pack", "mini",
            "2nd generation", "2025 model",
        ),
        uses=(
            "commuting", "the home office", "gaming marathons", "long-haul travel", "the gym",
            "video calls", "streaming", "students",
        ),
        accessories=(
            "a USB-C cable", "a travel pouch", "three sizes of ear tips", "a wall adapter",
            "a mounting kit", "a quick-start guide",
        ),
        care=("wipe with a dry microfibre cloth", "keep away from moisture and direct heat"),
    ),
    _Category(
        slug="home-kitchen",
        noun="kitchenware",
        price_median=35.0,
        products=(
            "cast iron skillet", "chef's knife", "French press", "stand mixer", "air fryer",
            "cutting board", "stock pot", "electric kettle", "dinnerware set", "storage jars",
            "espresso machine", "toaster", "knife block", "mixing bowls", "non-stick frying pan",
            "dutch oven", "salad spinner",
        ),
        materials=(
            "stainless steel", "pre-seasoned cast iron", "borosilicate glass", "bamboo", "stoneware",
            "enamelled steel", "acacia wood", "BPA-free plastic",
        ),
        features=(
            "dishwasher-safe parts", "oven safety up to 260 °C", "induction compatibility",
            "a PFOA-free non-stick coating", "an ergonomic stay-cool handle", "an airtight silicone seal",
            "one-touch controls", "removable parts for easy cleaning", "a 1500 W heating element",
            "a keep-warm function", "a full-tang forged blade",
        ),
        sizes=("small", "large", "family size", "set of 2", "set of 4", "compact", "professional grade"),
        uses=(
            "weeknight dinners", "meal prep", "entertaining guests", "small kitchens", "camping trips",
            "baking weekends", "busy mornings",
        ),
        accessories=(
            "a recipe booklet", "a protective sleeve", "two replacement filters", "a measuring scoop",
            "a silicone spatula",
        ),
        care=("hand wash to keep the finish", "dry thoroughly and oil lightly after use", "dishwasher safe"),
    ),
    _Category(
        slug="fashion",
        noun="clothing and accessories",
        price_median=45.0,
        products=(
            "denim jacket", "wool coat", "running shoes", "leather belt", "crossbody bag", "linen shirt",
            "chinos", "knit sweater", "ankle boots", "rain jacket", "silk scarf", "hoodie", "summer dress",
            "sunglasses", "baseball cap", "wide-leg trousers", "puffer vest",
        ),
        materials=(
            "organic cotton", "merino wool", "full-grain leather", "recycled polyester", "washed linen",
            "suede", "a cashmere blend", "selvedge denim",
        ),
        features=(
            "a relaxed fit", "a slim tailored fit", "machine-washable fabric", "a breathable lining",
            "an adjustable strap", "a hidden inner pocket", "reinforced stitching",
            "a water-repellent finish", "a cushioned insole", "UV400 lenses", "YKK zips",
        ),
        sizes=("size S", "size M", "size L", "size XL", "EU 42", "UK 8", "US 10", "one size", "W32 L30"),
        uses=(
            "everyday wear", "the office", "weekend trips", "layering in autumn", "outdoor festivals",
            "evenings out", "city walks",
        ),
        accessories=("a dust bag", "spare buttons", "a gift box", "a care card"),
        care=(
            "machine wash cold, inside out", "dry clean only", "do not tumble dry", "hand wash in cool water",
        ),
    ),
    _Category(
        slug="sports-outdoors",
        noun="outdoor gear",
        price_median=40.0,
        products=(
            "yoga mat", "camping tent", "hiking backpack", "trekking poles", "sleeping bag",
            "road bike helmet", "resistance bands", "adjustable dumbbells", "water bottle", "headlamp",
            "foam roller", "kayak paddle", "climbing harness", "skipping rope", "insulated flask",
            "trail running vest",
        ),
        materials=(
            "ripstop nylon", "TPE foam", "carbon fibre", "aluminium alloy", "18/8 stainless steel",
            "natural rubber", "EVA foam",
        ),
        features=(
            "an ultralight design", "taped waterproof seams", "a non-slip surface", "an adjustable hip belt",
            "a pack size smaller than a loaf of bread", "double-wall vacuum insulation",
            "reflective details for night visibility", "quick-release buckles", "a comfort rating of -5 °C",
            "MIPS impact protection", "a lifetime repair programme",
        ),
        sizes=("regular", "long", "one size", "small", "large", "pro version", "twin pack", "2025 edition"),
        uses=(
            "backpacking", "home workouts", "trail running", "weekend camping", "pilates",
            "cycling commutes", "alpine hikes",
        ),
        accessories=("a stuff sack", "a carry strap", "a repair kit", "spare guy lines", "an exercise chart"),
        care=("rinse with fresh water after use", "air dry away from direct sunlight"),
    ),
    _Category(
        slug="beauty",
        noun="skin and hair care",
        price_median=22.0,
        products=(
            "facial serum", "moisturiser", "shampoo", "conditioner", "hair dryer", "electric toothbrush",
            "lip balm", "sunscreen", "makeup brush set", "eau de parfum", "beard oil", "hand cream",
            "clay mask", "curling iron", "body wash", "eye cream",
        ),
        materials=(
            "hyaluronic acid", "vitamin C", "shea butter", "argan oil", "niacinamide", "aloe vera",
            "ceramides", "jojoba oil",
        ),
        features=(
            "a fragrance-free formula", "dermatological testing", "cruelty-free and vegan ingredients",
            "suitability for sensitive skin", "SPF 50 broad-spectrum protection",
            "ionic technology that reduces frizz", "recyclable packaging", "a non-comedogenic texture",
            "a two-minute smart timer", "three heat settings",
        ),
        sizes=("travel size", "full size", "value pack", "duo pack", "limited edition", "refill pack"),
        uses=("daily routines", "dry skin", "curly hair", "sensitive skin", "gift sets", "post-workout care"),
        accessories=("a travel case", "two replacement heads", "a diffuser attachment", "a sample sachet"),
        care=("store below 25 °C", "use within 12 months of opening"),
    ),
    _Category(
        slug="toys-games",
        noun="toys and games",
        price_median=25.0,
        products=(
            "building blocks set", "wooden puzzle", "board game", "remote control car", "plush bear",
            "doll house", "science kit", "card game", "train set", "stunt kite", "art easel",
            "magnetic tiles", "mini drone", "jigsaw puzzle", "stacking rings",
        ),
        materials=(
            "FSC-certified wood", "non-toxic ABS", "soft plush", "recycled cardboard", "food-grade silicone",
        ),
        features=(
            "a recommended age of 3+", "a recommended age of 8 and up", "play for 2 to 6 players",
            "no batteries required", "a rechargeable battery", "pieces that develop fine motor skills",
            "a storage box", "testing to EN71 safety standards", "a 20-minute average playing time",
        ),
        sizes=("travel edition", "deluxe edition", "starter set", "large", "mini", "classic edition"),
        uses=("family game nights", "birthday gifts", "rainy days", "STEM learning", "long car journeys"),
        accessories=("a rule book", "a drawstring bag", "spare propellers", "a colouring poster"),
        care=("wipe clean with a damp cloth", "surface wash only"),
    ),
    _Category(
        slug="furniture",
        noun="furniture",
        price_median=180.0,
        products=(
            "office chair", "standing desk", "bookshelf", "sofa bed", "bedside table", "dining table",
            "bar stool", "TV stand", "wardrobe", "coffee table", "shoe rack", "floor lamp", "bed frame",
            "armchair", "storage ottoman",
        ),
        materials=(
            "solid oak", "walnut veneer", "powder-coated steel", "velvet upholstery", "natural rattan",
            "engineered wood", "smoked glass", "a linen-blend fabric",
        ),
        features=(
            "tool-free assembly", "electric height adjustment", "a weight capacity of 120 kg",
            "soft-close drawers", "a scratch-resistant finish", "adjustable lumbar support",
            "a cable management tray", "an anti-tip wall kit", "hidden storage",
        ),
        sizes=("compact", "large", "double", "king size", "2-pack", "extra wide", "120 cm wide"),
        uses=(
            "home offices", "small apartments", "living rooms", "kids' rooms", "studio flats", "guest rooms",
        ),
        accessories=("all fixings and an Allen key", "felt floor protectors", "an assembly video link"),
        care=("dust with a soft dry cloth", "avoid placing in direct sunlight"),
    ),
    _Category(
        slug="automotive",
        noun="car accessories",
        price_median=35.0,
        products=(
            "dash cam", "car phone mount", "tyre inflator", "jump starter", "seat covers", "floor mats",
            "roof box", "LED headlight bulbs", "car vacuum", "wiper blades", "OBD2 scanner",
            "steering wheel cover", "tow rope", "parking sensor kit", "trickle charger",
        ),
        materials=("heavy-duty rubber", "PU leather", "ABS plastic", "aluminium", "high-tensile polyester"),
        features=(
            "1440p night vision", "a 12 V socket plug", "a universal fit for most cars", "a G-sensor lock",
            "an auto shut-off at target pressure", "a 2000 A peak current", "a waterproof lining",
            "plug-and-play installation", "a loop recording mode",
        ),
        sizes=("universal", "4-piece set", "2-pack", "heavy-duty", "compact", "large"),
        uses=("daily driving", "road trips", "winter mornings", "fleet vehicles", "family cars"),
        accessories=("a 32 GB memory card", "a storage bag", "mounting adhesive pads", "a spare fuse"),
        care=("clean with mild soapy water", "check fittings every few months"),
    ),
    _Category(
        slug="garden",
        noun="garden tools",
        price_median=30.0,
        products=(
            "garden hose", "pruning shears", "raised garden bed", "solar lights", "cordless lawn mower",
            "watering can", "compost bin", "bird feeder", "hedge trimmer", "plant pots", "patio heater",
            "hammock", "leaf blower", "seed starter kit", "garden kneeler",
        ),
        materials=(
            "galvanised steel", "cedar wood", "UV-stabilised resin", "terracotta", "high-carbon steel",
            "weatherproof polyester",
        ),
        features=(
            "a kink-free design", "a brushless motor", "a 36 V battery", "auto dusk-to-dawn sensing",
            "frost-resistant walls", "drainage holes", "a non-slip grip", "a rust-proof coating",
        ),
        sizes=("small", "medium", "large", "set of 3", "2-pack", "extra long", "compact"),
        uses=("balcony gardens", "vegetable patches", "allotments", "patio evenings", "spring clean-ups"),
        accessories=("a spray nozzle", "a wall hook", "a spare blade", "ground stakes"),
        care=("store indoors over winter", "oil moving parts occasionally"),
    ),
    _Category(
        slug="pet-supplies",
        noun="pet products",
        price_median=28.0,
        products=(
            "orthopaedic dog bed", "cat tree", "dog harness", "automatic feeder", "pet carrier",
            "litter box", "chew toy", "aquarium filter", "grooming brush", "retractable lead",
            "scratching post", "pet water fountain", "bird cage", "puppy training pads",
        ),
        materials=(
            "memory foam", "sisal rope", "padded mesh", "natural rubber", "stainless steel", "oxford fabric",
        ),
        features=(
            "a removable washable cover", "reflective stitching", "a programmable timer",
            "a whisper-quiet pump", "chew-resistant construction", "a non-slip base", "odour control",
        ),
        sizes=("small", "medium", "large", "XL", "2-pack", "value pack"),
        uses=("senior dogs", "indoor cats", "puppies", "long walks", "busy owners", "multi-pet homes"),
        accessories=("a spare filter", "a poop bag holder", "a feather wand toy", "a quick-start guide"),
        care=("machine wash the cover at 30 °C", "rinse the bowl weekly"),
    ),
)

#: Category slugs in a fixed order; the ``category`` column takes these values.
CATEGORIES: tuple[str, ...] = tuple(c.slug for c in _CATEGORY_DEFS)

_BRANDS = (
    "Northvale", "Kestrel & Co", "Aurelio", "Brightwell", "Fjordline", "Oakhaven", "Lumora", "Vantek",
    "Halden", "Mossgrove", "Corvane", "Tidewater", "Ashby Works", "Novaline", "Pellucid", "Ridgeway",
    "Solenne", "Tamarind", "Urbanist", "Wrenfield", "Zephyra", "Blue Heron", "Copperleaf", "Driftwood Lab",
    "Elmstead", "Foxglove", "Greystone", "Hearthly", "Ironbark", "Juniper Row", "Kinfolk Goods", "Larkspur",
    "Meridian", "Nimbus", "Orchard Lane", "Pinecrest", "Quillon", "Redwick", "Stillwater", "Thornbury",
    "Umbra Studio", "Verdant", "Westerly", "Yarrow", "Alder & Ash", "Beacon", "Cinderfield", "Dovetail",
)
_COLOURS = (
    "black", "white", "navy", "charcoal", "sage green", "olive", "burgundy", "mustard yellow", "sky blue",
    "terracotta", "sand", "stone grey", "forest green", "blush pink", "cream", "cobalt blue", "rust orange",
    "graphite", "ivory", "teal", "lavender", "matte black", "brushed silver", "walnut brown", "coral",
)
_ADJECTIVES = (
    "premium", "lightweight", "heavy-duty", "compact", "ergonomic", "classic", "modern", "minimalist",
    "professional", "eco-friendly", "handcrafted", "rugged", "slimline", "vintage-style", "foldable",
    "portable", "deluxe", "everyday", "versatile", "award-winning",
)
_CONDITIONS = (
    "brand new in sealed box", "new, open box", "like new, used twice", "used - good, light signs of wear",
    "refurbished with a 12-month warranty", "ex-display, fully working",
)
_CITIES = (
    "Rotterdam", "Leeds", "Austin", "Lyon", "Melbourne", "Toronto", "Hamburg", "Porto", "Denver", "Dublin",
    "Gothenburg", "Bristol", "Valencia", "Ottawa", "Milan", "Krakow", "Seattle", "Glasgow", "Antwerp",
)
_CURRENCIES = ("$", "€", "£")
_QUOTES = (
    "Exactly as described and arrived a day early",
    "Bought this for my sister and she has not stopped using it",
    "Solid build, much better than the one it replaced",
    "Good value for the price, though the instructions could be clearer",
    "Second one I have ordered, no complaints at all",
    "Packaging was a bit battered but the item itself was perfect",
    "Looks even better in person",
    "Took five minutes to set up and works flawlessly",
    "Customer service sorted out a missing part within a day",
    "Would give six stars if I could",
    "Smaller than I expected, so check the measurements",
    "Still going strong after a year of daily use",
)
_QA = (
    ("Does it come with a warranty?", "Yes, every unit is covered against manufacturing defects."),
    ("Is the colour accurate in the photos?", "Colours can vary slightly depending on your screen."),
    ("Can I collect it in person?", "Yes, collection is possible by appointment on weekdays."),
    ("Do you ship internationally?", "We ship to most of Europe and North America; duties may apply."),
    ("Is assembly required?", "Only minimal assembly, and all tools are included."),
    ("Can I return it if it does not fit?", "Of course, just start a return from your order page."),
    ("Is this the latest version?", "Yes, this is the current model with the updated design."),
    ("Are spare parts available?", "Spare parts can be ordered directly from our support team."),
    ("Is it suitable as a gift?", "Yes, gift wrapping and a personal note can be added at checkout."),
)
_NOTES = (
    "images are for illustration only and accessories shown may not be included.",
    "orders placed on weekends are dispatched on Monday.",
    "this listing is for a single item unless stated otherwise.",
    "please allow 1-2 cm difference due to manual measurement.",
    "we do not ship to PO boxes.",
    "stock is shared with our high-street shop, so availability can change quickly.",
)

#: Description sentences. Every template must read well for every category, since slots are filled
#: independently. The count is made prime below so a per-row stride visits all before repeating.
_SENTENCES: tuple[str, ...] = (
    "Made from {material} for years of everyday use.",
    "The {product} is built from {material} and finished in {colour}.",
    "Key features: {feature}; {feature2}; {feature3}.",
    "Highlights include {feature} and {feature2}.",
    "You also get {feature}.",
    "Perfect for {use}.",
    "Ideal for {use} and {use2}.",
    "Designed with {use} in mind, it fits easily into any routine.",
    "Available in {colour}, {colour2} and {colour3}.",
    "Shown here in {colour}; {colour2} is also available on request.",
    "Size: {size}.",
    "Dimensions: {dims}. Weight: {weight}.",
    "Model number: {model}.",
    "Price: {price}, VAT included.",
    "Now only {price} (was {old_price}).",
    "Save {pct}% this week only.",
    "Bundle offer: buy {n} and get {pct}% off your whole order.",
    "Free shipping on orders over {currency}{threshold}.",
    "Ships within {ship_days} business days from our {city} warehouse.",
    "Order before {hour} for same-day dispatch.",
    "Express delivery to {city} and surrounding areas is available at checkout.",
    "{return_days}-day free returns, no questions asked.",
    "Returns are accepted within {return_days} days in the original packaging.",
    "Covered by a {warranty}-year manufacturer warranty.",
    "Condition: {condition}.",
    "Package includes: 1 x {product}, {accessory} and a printed user manual.",
    "Comes with {accessory}.",
    "Rated {rating} out of 5 by {reviews} customers.",
    '"{quote}" - verified buyer from {city}.',
    "Q: {question} A: {answer}",
    "Our {brand} team has been making {noun} since {year}.",
    "Pairs well with the {brand} {product2}.",
    "Care instructions: {care}.",
    "Only {stock} left in stock, so order soon.",
    "In stock and ready to ship from {city}.",
    "Note: {note}",
    "Private sale from a smoke-free and pet-free home in {city}.",
    "Pickup in {city} is possible by appointment, otherwise it ships tracked.",
    "Listed by the {brand} official store, a top-rated seller since {year}.",
    "Each {product} is inspected by hand before it leaves our workshop.",
    "Compared with cheaper alternatives, the {material} construction feels {adj} and solid.",
    "Please check the measurements before ordering, as sizing varies between brands.",
    "Customers often buy it for {use}, or as a gift.",
    "One of our best sellers in {category_name} for {recent_year}.",
    "Questions? Message us and we usually reply within {reply_hours} hours.",
    "Every order supports our tree-planting partner in {country}.",
    "This {adj} {product} replaces our previous {model} edition.",
)
_COUNTRIES = ("Kenya", "Brazil", "Indonesia", "Scotland", "Madagascar", "Peru", "Portugal")

#: Titles: full ones for listings with a description, short ones for the many terse listings.
_TITLES: tuple[str, ...] = (
    "{Brand} {Adj} {Product} - {Colour}, {size}",
    "{Brand} {Product} in {Material}, {Colour} ({size})",
    "{Adj} {Material} {Product} by {Brand} | {Feature} | {size}",
    "NEW {Brand} {Product} {model} - {Feature}",
    "{Product} for {Use} - {Brand} {Material}, {Colour}",
    "{Brand} {model} {Product}, {size}, {Colour} - {price}",
    "[{Condition}] {Brand} {Product} - {Colour} - {size}",
)
_SHORT_TITLES: tuple[str, ...] = (
    "{Brand} {Product} {model}",
    "{Brand} {Product}, {Colour}, {size}",
    "{Brand} {Product} - {price}",
    "{Adj} {Product} ({Colour}) - {price}",
)
_SHORT_TITLE_BELOW = 10  # target word counts below this get a short title
# fmt: on


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


if not _is_prime(len(_SENTENCES)):  # pragma: no cover - guards future edits of the template list
    raise RuntimeError(f"_SENTENCES must have a prime length, has {len(_SENTENCES)}")


def _fields(template: str) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)


def _cap(s: str) -> str:
    """Capitalise each word's first letter but keep acronyms (``USB-C``) and the rest intact."""
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


_SENTENCE_FIELDS = tuple(_fields(t) for t in _SENTENCES)
_TITLE_FIELDS = tuple(_fields(t) for t in _TITLES)
_SHORT_TITLE_FIELDS = tuple(_fields(t) for t in _SHORT_TITLES)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

_DRAW_BUFFER = 1 << 15


class _Draws:
    """Buffered uniform draws from one numpy Generator.

    Per-slot choices are made in Python (string assembly cannot be vectorised), and a Python float
    list is ~20x cheaper to index than calling the Generator once per choice. Refills happen in fixed
    sizes, so the sequence of picks depends only on the seed.
    """

    __slots__ = ("_buf", "_i", "_rng")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buf: list[float] = rng.random(_DRAW_BUFFER).tolist()
        self._i = 0

    def u(self) -> float:
        i = self._i
        if i == _DRAW_BUFFER:
            self._buf = self._rng.random(_DRAW_BUFFER).tolist()
            i = 0
        self._i = i + 1
        return self._buf[i]

    def pick(self, n: int) -> int:
        return int(self.u() * n)

    def choice(self, seq: tuple[str, ...]) -> str:
        return seq[int(self.u() * len(seq))]

    def other(self, seq: tuple[str, ...], not_this: str) -> str:
        """A second choice different from the first, so lists never read "X and X"."""
        i = seq.index(not_this)
        return seq[(i + 1 + int(self.u() * (len(seq) - 1))) % len(seq)]


def _fmt_money(currency: str, amount: float) -> str:
    return f"{currency}{amount:,.2f}"


def _psych_price(x: float) -> float:
    """Shop prices end in .99 (or .49 under ten): it keeps texts realistic and numbers varied."""
    if x < 10:
        return max(math.floor(x) + 0.49, 0.99)
    return math.ceil(x) - 0.01


class _Row:
    """The facts one listing keeps consistent across its title and sentences."""

    __slots__ = ("brand", "cat", "colour", "currency", "material", "price", "price_str", "product")

    def __init__(
        self,
        cat: _Category,
        brand: str,
        product: str,
        material: str,
        colour: str,
        currency: str,
        price: float,
    ) -> None:
        self.cat = cat
        self.brand = brand
        self.product = product
        self.material = material
        self.colour = colour
        self.currency = currency
        self.price = price
        self.price_str = _fmt_money(currency, price)


def _slot(name: str, row: _Row, d: _Draws, used: dict[str, str]) -> str:
    """Value of one template slot; ``used`` holds the slots already filled in this template."""
    cat = row.cat
    match name:
        case "brand":
            return row.brand
        case "Brand":
            return row.brand
        case "product":
            return row.product
        case "Product":
            return _cap(row.product)
        case "material":
            return row.material
        case "Material":
            return _cap(row.material)
        case "colour":
            return row.colour
        case "Colour":
            return _cap(row.colour)
        case "colour2":
            return d.other(_COLOURS, row.colour)
        case "colour3":
            return d.other(_COLOURS, used.get("colour2", row.colour))
        case "price":
            return row.price_str
        case "currency":
            return row.currency
        case "feature" | "Feature":
            f = d.choice(cat.features)
            return f[:1].upper() + f[1:] if name == "Feature" else f
        case "feature2":
            return d.other(cat.features, used["feature"])
        case "feature3":
            f3 = d.other(cat.features, used["feature2"])
            while f3 == used["feature"]:
                f3 = d.other(cat.features, f3)
            return f3
        case "use":
            return d.choice(cat.uses)
        case "Use":
            return _cap(d.choice(cat.uses))
        case "use2":
            return d.other(cat.uses, used["use"])
        case "size":
            return d.choice(cat.sizes)
        case "adj":
            return d.choice(_ADJECTIVES)
        case "Adj":
            return _cap(d.choice(_ADJECTIVES))
        case "accessory":
            return d.choice(cat.accessories)
        case "care":
            return d.choice(cat.care)
        case "noun":
            return cat.noun
        case "category_name":
            return cat.noun
        case "product2":
            return d.other(cat.products, row.product)
        case "condition":
            return d.choice(_CONDITIONS)
        case "Condition":
            return _cap(d.choice(_CONDITIONS).split(",")[0])
        case "city":
            return d.choice(_CITIES)
        case "country":
            return d.choice(_COUNTRIES)
        case "quote":
            return d.choice(_QUOTES)
        case "question":
            qa = _QA[d.pick(len(_QA))]
            used["answer"] = qa[1]
            return qa[0]
        case "answer":
            return used["answer"]
        case "note":
            return d.choice(_NOTES)
        case "old_price":
            return _fmt_money(row.currency, _psych_price(row.price * (1.1 + 0.6 * d.u())))
        case "pct":
            return str((10, 15, 20, 25, 30, 40, 50)[d.pick(7)])
        case "n":
            return str(2 + d.pick(4))
        case "threshold":
            return str((25, 35, 50, 75, 99)[d.pick(5)])
        case "ship_days":
            return str(2 + d.pick(5))
        case "return_days":
            return str((14, 30, 60, 90, 100)[d.pick(5)])
        case "warranty":
            return str(1 + d.pick(5))
        case "hour":
            return f"{1 + d.pick(5)} pm"
        case "reply_hours":
            return str((2, 4, 12, 24, 48)[d.pick(5)])
        case "stock":
            return str(1 + d.pick(12))
        case "dims":
            return f"{10 + d.pick(190)} x {5 + d.pick(95)} x {2 + d.pick(60)} cm"
        case "weight":
            w = math.exp(-2.5 + 6.0 * d.u())  # ~80 g .. ~33 kg
            return f"{round(w * 1000)} g" if w < 1 else f"{w:.1f} kg"
        case "model":
            letters = string.ascii_uppercase
            return f"{letters[d.pick(26)]}{letters[d.pick(26)]}-{100 + d.pick(9900)}"
        case "year":
            return str(1965 + d.pick(57))
        case "recent_year":
            return str(2019 + d.pick(6))
        case "rating":
            return f"{3.8 + d.pick(12) / 10:.1f}"
        case "reviews":
            return f"{round(math.exp(2.5 + 6.5 * d.u())):,}"
        case _:  # pragma: no cover - a template names a slot this function does not know
            raise KeyError(name)


def _fill(template: str, fields: tuple[str, ...], row: _Row, d: _Draws) -> str:
    used: dict[str, str] = {}
    for f in fields:
        if f not in used:
            used[f] = _slot(f, row, d, used)
    return template.format_map(used)


def _generate_texts(rng: np.random.Generator, cat_idx: np.ndarray, targets: np.ndarray) -> list[str]:
    """Listings for the given category indices and target word counts.

    Whole sentences are appended until a listing reaches its target, in a per-row order (start,
    stride modulo a prime) that visits every template once before repeating any, so long listings
    read like spec sheets rather than loops.
    """
    n = len(cat_idx)
    d = _Draws(rng)
    u = rng.random((n, 7))
    cats = [_CATEGORY_DEFS[i] for i in cat_idx.tolist()]
    brand_i = (u[:, 0] * len(_BRANDS)).astype(np.int64).tolist()
    colour_i = (u[:, 1] * len(_COLOURS)).astype(np.int64).tolist()
    currency_i = (u[:, 2] * len(_CURRENCIES)).astype(np.int64).tolist()
    prod_u = u[:, 3].tolist()
    mat_u = u[:, 4].tolist()
    start_i = (u[:, 5] * len(_SENTENCES)).astype(np.int64).tolist()
    stride_i = (1 + u[:, 6] * (len(_SENTENCES) - 1)).astype(np.int64).tolist()
    price_z = rng.standard_normal(n).tolist()
    n_sent = len(_SENTENCES)

    out: list[str] = []
    for k in range(n):
        cat = cats[k]
        row = _Row(
            cat,
            _BRANDS[brand_i[k]],
            cat.products[int(prod_u[k] * len(cat.products))],
            cat.materials[int(mat_u[k] * len(cat.materials))],
            _COLOURS[colour_i[k]],
            _CURRENCIES[currency_i[k]],
            _psych_price(cat.price_median * math.exp(0.6 * price_z[k])),
        )
        target = int(targets[k])
        if target < _SHORT_TITLE_BELOW:
            t = d.pick(len(_SHORT_TITLES))
            title = _fill(_SHORT_TITLES[t], _SHORT_TITLE_FIELDS[t], row, d)
        else:
            t = d.pick(len(_TITLES))
            title = _fill(_TITLES[t], _TITLE_FIELDS[t], row, d)
        words = title.count(" ") + 1
        if words >= target:
            out.append(title)
            continue
        parts: list[str] = []
        s, stride = start_i[k], stride_i[k]
        while words < target:
            sentence = _fill(_SENTENCES[s], _SENTENCE_FIELDS[s], row, d)
            parts.append(sentence)
            words += sentence.count(" ") + 1
            s = (s + stride) % n_sent
        out.append(title + "\n" + " ".join(parts))
    return out


def _check_fraction(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")


def generate_items(rows: int, *, seed: int = 7, id_offset: int = 0, bad_fraction: float = 0.0) -> pa.Table:
    """A deterministic table of ``rows`` product listings in ``ITEMS_SCHEMA``.

    ``id_offset`` is mixed into the seed as well as the ids, so tables generated in chunks with the
    same seed do not repeat each other's texts. Bad rows are chosen from their own random stream
    after the texts are built, so every good row is identical whatever ``bad_fraction`` is: a test
    can compare a run with poison rows against one without. Exactly ``round(rows * bad_fraction)``
    rows are bad; ``floor`` of half of them have ``""`` as text, the rest null.
    """
    if rows < 0:
        raise ConfigError(f"rows must be >= 0, got {rows}")
    if id_offset < 0:
        raise ConfigError(f"id_offset must be >= 0, got {id_offset}")
    _check_fraction("bad_fraction", bad_fraction)

    ss_len, ss_cat, ss_text, ss_time, ss_bad = np.random.SeedSequence([seed, id_offset]).spawn(5)
    targets = np.clip(
        np.rint(np.random.default_rng(ss_len).lognormal(math.log(_LEN_MEDIAN), _LEN_SIGMA, rows)),
        _LEN_MIN,
        _LEN_MAX,
    ).astype(np.int64)
    cat_idx = np.random.default_rng(ss_cat).integers(0, len(_CATEGORY_DEFS), rows)
    texts: list[str | None] = list(_generate_texts(np.random.default_rng(ss_text), cat_idx, targets))
    ts = _BASE_TS_US + np.random.default_rng(ss_time).integers(0, _YEAR_US, rows)

    n_bad = round(rows * bad_fraction)
    if n_bad:
        bad = np.random.default_rng(ss_bad).choice(rows, size=n_bad, replace=False).tolist()
        half = n_bad // 2
        for i in bad[:half]:
            texts[i] = ""
        for i in bad[half:]:
            texts[i] = None

    return pa.table(
        {
            "item_id": pa.array([format_item_id(i) for i in range(id_offset, id_offset + rows)], pa.string()),
            "text": pa.array(texts, pa.string()),
            "category": pa.array([CATEGORIES[i] for i in cat_idx.tolist()], pa.string()),
            "updated_at": pa.array(ts, ITEMS_SCHEMA.field("updated_at").type),
        },
        schema=ITEMS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------------
# Delta
# --------------------------------------------------------------------------------------------------


def _local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI, or None for object stores (their checks are delta-rs's)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # plain path, or a Windows drive letter
        return Path(uri)
    return None


def _reason(exc: BaseException) -> str:
    """delta-rs puts the OS cause on a second line; SluiceError folds it into the one-line message."""
    return str(exc).strip() or type(exc).__name__


def write_items_table(
    uri: str,
    table: pa.Table,
    *,
    mode: Literal["error", "overwrite"] = "error",
    storage_options: dict[str, str] | None = None,
) -> int:
    """Write ``table`` as a Delta table with Change Data Feed on, and return the new version.

    CDF must be on from the first version, or the first incremental run would have nothing to read.
    Overwriting a table created elsewhere without CDF turns it on first (one extra commit), because
    delta-rs applies ``configuration`` only when it creates a table. A path that holds something
    other than a Delta table is refused in both modes rather than mixed into.
    """
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import DeltaError

    if mode not in ("error", "overwrite"):
        raise ConfigError(f"mode must be 'error' or 'overwrite', got {mode!r}")
    local = _local_path(uri)
    try:
        exists = DeltaTable.is_deltatable(uri, storage_options)
    except (DeltaError, OSError) as exc:
        raise SinkError(f"cannot write items table to {uri}: {_reason(exc)}") from exc
    if exists and mode == "error":
        raise SinkError(f"items table {uri} already exists; pass mode='overwrite' to replace it or choose a new path")
    if not exists and local is not None and local.exists() and (not local.is_dir() or any(local.iterdir())):
        raise SinkError(
            f"cannot write items table to {uri}: the path exists and is not a Delta table; choose an empty or new path"
        )
    try:
        if exists:
            dt = DeltaTable(uri, storage_options=storage_options)
            if dt.metadata().configuration.get(_CDF_KEY, "false").lower() != "true":
                dt.alter.set_table_properties({_CDF_KEY: "true"})
            write_deltalake(dt, table, mode="overwrite", schema_mode="overwrite")
        else:
            write_deltalake(
                uri,
                table,
                mode="error",
                configuration={_CDF_KEY: "true"},
                storage_options=storage_options,
            )
        return DeltaTable(uri, storage_options=storage_options).version()
    except (DeltaError, OSError) as exc:
        raise SinkError(f"cannot write items table to {uri}: {_reason(exc)}") from exc


@dataclass(frozen=True)
class MutationSummary:
    """What ``mutate_items`` changed, so a test can assert the incremental run saw exactly that.

    All three kinds land in **one** Delta commit (a single MERGE), so ``version`` is
    ``previous_version + 1`` and ``load_cdf(starting_version=version)`` returns exactly these
    changes; when nothing was asked for, no commit is made and ``version == previous_version``.
    """

    updated_ids: tuple[str, ...]
    inserted_ids: tuple[str, ...]
    deleted_ids: tuple[str, ...]
    previous_version: int
    version: int

    @property
    def upserted_ids(self) -> tuple[str, ...]:
        """The ids an incremental backfill must (re-)embed."""
        return self.updated_ids + self.inserted_ids


_MUTATION_SALT = 0x6D757461  # "muta": keeps mutate streams apart from generate_items(seed=...)


def mutate_items(
    uri: str,
    *,
    update_fraction: float,
    insert_rows: int,
    delete_rows: int = 0,
    seed: int,
    storage_options: dict[str, str] | None = None,
) -> MutationSummary:
    """Update, insert and delete items in one MERGE commit, deterministically for a table and seed.

    The sample is drawn from the ids sorted numerically, so it does not depend on how the table's
    files happen to be laid out. Updated and inserted rows get ``updated_at`` after the table's
    current maximum, so a watermark-based reader sees them as new too. Updated and deleted ids are
    disjoint; inserted ids continue after the current maximum id.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    _check_fraction("update_fraction", update_fraction)
    if insert_rows < 0 or delete_rows < 0:
        raise ConfigError(f"insert_rows and delete_rows must be >= 0, got {insert_rows} and {delete_rows}")
    try:
        dt = DeltaTable(uri, storage_options=storage_options)
        current = dt.to_pyarrow_table(columns=["item_id", "category", "updated_at"])
    except (DeltaError, OSError) as exc:
        raise SourceError(f"cannot read items table {uri}: {_reason(exc)}") from exc
    previous_version = dt.version()

    ids = current.column("item_id").cast(pa.string())
    well_formed = pc.match_substring_regex(ids, rf"^{_ID_PREFIX}[0-9]+$")
    if not pc.all(well_formed).as_py() and len(ids):
        raise SourceError(f"items table {uri} has ids not of the form '{format_item_id(42)}'; cannot mutate")
    nums = pc.cast(pc.utf8_slice_codeunits(ids, len(_ID_PREFIX)), pa.int64())
    order = pc.sort_indices(nums)
    ids = ids.take(order)
    cats = current.column("category").take(order).to_pylist()
    n = len(ids)

    n_update = round(n * update_fraction)
    if n_update + delete_rows > n:
        raise ConfigError(f"cannot update {n_update} and delete {delete_rows} rows of {uri}: it has only {n} rows")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MUTATION_SALT]))
    perm = rng.permutation(n)
    upd_pos = np.sort(perm[:n_update])
    del_pos = np.sort(perm[n_update : n_update + delete_rows])
    next_id = (pc.max(nums).as_py() + 1) if n else 0
    ins_ids = [format_item_id(i) for i in range(next_id, next_id + insert_rows)]
    upd_ids: list[str] = ids.take(pa.array(upd_pos, pa.int64())).to_pylist()
    del_ids: list[str] = ids.take(pa.array(del_pos, pa.int64())).to_pylist()

    if not (upd_ids or ins_ids or del_ids):
        return MutationSummary((), (), (), previous_version, previous_version)

    # New texts keep each updated item's category (an edited listing stays in its section).
    cat_lookup = {slug: i for i, slug in enumerate(CATEGORIES)}
    upd_cat = np.array([cat_lookup.get(cats[p], p % len(CATEGORIES)) for p in upd_pos.tolist()], dtype=np.int64)
    upd_targets = np.clip(
        np.rint(rng.lognormal(math.log(_LEN_MEDIAN), _LEN_SIGMA, n_update)), _LEN_MIN, _LEN_MAX
    ).astype(np.int64)
    upd_texts = _generate_texts(rng, upd_cat, upd_targets)
    inserted = generate_items(insert_rows, seed=seed, id_offset=next_id)

    max_ts = pc.max(current.column("updated_at")).value if n else None
    ts_floor = (max_ts if max_ts is not None else _BASE_TS_US) + 1_000_000
    n_upsert = n_update + insert_rows
    new_ts = ts_floor + rng.integers(0, 86_400 * 1_000_000, n_upsert)

    ts_type = ITEMS_SCHEMA.field("updated_at").type
    source = pa.table(
        {
            "item_id": pa.array(upd_ids + ins_ids + del_ids, pa.string()),
            "text": pa.array(upd_texts + inserted.column("text").to_pylist() + [None] * len(del_ids), pa.string()),
            "category": pa.array(
                [cats[p] for p in upd_pos.tolist()] + inserted.column("category").to_pylist() + [None] * len(del_ids),
                pa.string(),
            ),
            "updated_at": pa.concat_arrays([pa.array(new_ts, ts_type), pa.nulls(len(del_ids), ts_type)]),
            "_op": pa.array(["update"] * n_update + ["insert"] * insert_rows + ["delete"] * len(del_ids)),
        }
    )
    try:
        (
            dt.merge(source, "t.item_id = s.item_id", source_alias="s", target_alias="t")
            .when_matched_update({"text": "s.text", "updated_at": "s.updated_at"}, predicate="s._op = 'update'")
            .when_matched_delete(predicate="s._op = 'delete'")
            .when_not_matched_insert(
                {c: f"s.{c}" for c in ("item_id", "text", "category", "updated_at")},
                predicate="s._op = 'insert'",
            )
            .execute()
        )
        version = DeltaTable(uri, storage_options=storage_options).version()
    except (DeltaError, OSError) as exc:
        raise SinkError(f"cannot mutate items table {uri}: {_reason(exc)}") from exc
    return MutationSummary(tuple(upd_ids), tuple(ins_ids), tuple(del_ids), previous_version, version)
