"""The model section of a job config, and the one function that turns it into a loaded encoder.

It is a pydantic model (``extra="forbid"``) because it travels from YAML to every worker: a typo
such as ``precison`` must fail on the driver, not silently run fp32 on a thousand executors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from transforms.models.artifact import resolve_artifact
from transforms.models.cache import shared
from transforms.models.device import DeviceSetting, PrecisionSetting, configure_threads, resolve_device
from transforms.models.text_encoder import TextEncoder, load_text_encoder

DEFAULT_TEXT_MODEL = "builtin:all-MiniLM-L6-v2"


class ModelConfig(BaseModel):
    """Which model, on what, at which precision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        DEFAULT_TEXT_MODEL,
        description="builtin:NAME, a Hugging Face encoder directory, a TorchScript file or a .safetensors file",
    )
    name: str | None = Field(None, description="model_name written on rows; defaults to the artifact's name")
    tokenizer: str | None = Field(None, description="tokenizer.json (required for TorchScript/safetensors)")
    model_class: str | None = Field(None, description="'package.module:Class' for a .safetensors artifact")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = Field(None, description="expected model_version; loading fails if the artifact differs")
    precision: PrecisionSetting = "auto"
    device: DeviceSetting = "auto"
    max_seq_length: int | None = Field(None, ge=1, le=8192)
    compile: bool = Field(False, description="torch.compile the model (GPU only)")
    calibration_texts: tuple[str, ...] = Field(
        (),
        description="int8 only: in-domain texts for activation smoothing; the backfill fills this with a "
        "fixed sample of its source when left empty",
    )


def load_encoder(cfg: ModelConfig, *, gpu_address: str | None = None, cores: int | None = None) -> TextEncoder:
    """The process-wide encoder for ``cfg``: loaded on first use, reused afterwards."""
    configure_threads(cores)
    device = resolve_device(cfg.device, gpu_address=gpu_address)

    def load() -> TextEncoder:
        artifact = resolve_artifact(cfg.source, tokenizer=cfg.tokenizer, expected_version=cfg.sha256)
        return load_text_encoder(
            artifact,
            tokenizer=cfg.tokenizer,
            model_class=cfg.model_class,
            model_kwargs=cfg.model_kwargs,
            max_seq_length=cfg.max_seq_length,
            precision=cfg.precision,
            device=device,
            compile_model=cfg.compile,
            calibration_texts=cfg.calibration_texts,
        )

    return shared((cfg.model_dump_json(), str(device)), load)
