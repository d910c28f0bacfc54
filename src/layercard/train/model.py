"""The model under training: the caller's base (or a 4-bit copy) with the plan's adapters, and its undoing."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercard.artifacts import atomic_path
from layercard.errors import LayercardError, first_line
from layercard.inference import restore_modes, training_modes
from layercard.models import LoadedModel
from layercard.plan import Plan, check_lora_model
from layercard.progress import hide_library_deprecations

ADAPTER_DIR = "adapter"


def check_4bit() -> None:
    """Refuse QLoRA without a CUDA GPU and bitsandbytes."""
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise LayercardError("--load-in-4bit needs a CUDA GPU and bitsandbytes; none found")


def load_4bit(loaded: LoadedModel, device_index: int) -> nn.Module:
    """A fresh NF4 copy of the base (QLoRA); the caller's full-precision model is left alone."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    # the copy runs custom code only where the base did, which was asked for when it was loaded
    remote = type(loaded.model).__module__.startswith("transformers_modules")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            loaded.source,
            quantization_config=bnb,
            device_map={"": device_index},
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=remote,
        )
    except Exception as e:
        raise LayercardError(f"{loaded.source}: cannot load in 4 bit ({first_line(e)})") from e
    # No gradient checkpointing: step times stay comparable with the cost model, which assumed none.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


class Adapted:
    """A base model adapted in place; :meth:`restore` undoes it unless the base is a private copy."""

    def __init__(self, base: nn.Module, *, owned: bool) -> None:
        self.base = base
        self.owned = owned  # a 4-bit copy made for this run: nothing to restore
        self.flags = [(p, p.requires_grad) for p in base.parameters()]
        self.modes = training_modes(base)
        self.home = next(base.parameters()).device
        self.attrs = set(vars(base))  # the instance attributes the caller's model came with
        self.peft_model: Any = None
        self.aset: Any = None
        self.prepared: Any = None  # the model as Accelerate wrapped it

    def adapt(
        self,
        plan: Plan,
        kind: str,
        layers: Sequence[int],
        bottleneck: int,
        seed: int,
        *,
        eva_rho: float | None = None,
    ) -> nn.Module:
        """Add the plan's adapters: LoRA through PEFT (checked against the plan), else bottlenecks.

        With ``eva_rho`` the LoRA modules are made ready for EVA (B zero; A set later by
        :func:`layercard.train.eva.init_eva`).
        """
        if kind == "lora":
            from peft import get_peft_model

            config = plan.peft_config()
            if eva_rho is not None:
                from layercard.train.eva import eva_lora_config

                config = eva_lora_config(config, eva_rho)
            from layercard.adapters import undone_on_failure

            with warnings.catch_warnings(), undone_on_failure(self.base):
                # PEFT suggests meta-device LoRA weights for EVA; ours are small next to the base, and
                # the model must move to its device before EVA runs, which needs real ones.
                warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage")
                # inside this block, whose filters are fresh each time: said once would be said every run
                hide_library_deprecations()
                self.peft_model = get_peft_model(self.base, config)
            check_lora_model(plan, self.peft_model)
            return self.peft_model
        from layercard.adapters import add_adapters

        for p in self.base.parameters():
            p.requires_grad_(False)
        self.aset = add_adapters(self.base, kind, list(layers), bottleneck, seed=seed)
        return self.base

    def restore(self, accelerator: Any) -> None:
        """Remove the adapters and Accelerate's wrapper; reset grad flags, mode and device."""
        if self.prepared is not None:
            # Drops Accelerate's mixed-precision forward wrapper from the caller's model.
            accelerator.unwrap_model(self.prepared, keep_fp32_wrapper=False)
            if not self.owned:
                # and the marks it leaves: a caller's own prepare() of the model would do nothing, and the
                # forward it bound back to the instance ties the model to itself
                for name in {"_is_accelerate_prepared", "_original_forward", "forward"} - self.attrs:
                    vars(self.base).pop(name, None)
        if self.peft_model is not None and not self.owned:
            self.peft_model.unload()
        if self.aset is not None:
            self.aset.remove()
        if not self.owned:
            for p, r in self.flags:
                p.requires_grad_(r)
            restore_modes(self.modes)
            if next(self.base.parameters()).device != self.home:
                self.base.to(self.home)
        accelerator.free_memory()


def write_adapter(
    path: Path,
    kind: str,
    model: nn.Module,
    aset: Any,
    model_id: str,
    model_hash: str,
    readme: str,
    *,
    state_dict: dict[str, Any] | None = None,
    base_files: dict[str, str] | None = None,
) -> None:
    """The adapter folder, atomically: vanilla PEFT for LoRA, layercard's format for bottlenecks, and
    ``readme`` as its README.md (in place of PEFT's placeholder model card). ``state_dict``: the whole
    model's weights where ``model``'s own are sharded (LoRA only); ``base_files``: the hashes of the base's
    other files (``LoadedModel.base_files``), recorded beside its weights' hash."""
    from layercard.train.readme import README_FILE

    with atomic_path(path) as tmp:
        if kind == "lora":
            from layercard.adapters import write_base

            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            _sort_targets(tmp / "adapter_config.json")
            write_base(tmp, model_id, model_hash, base_files)  # PEFT's config names the base by a path only
        else:
            from layercard.adapters import save_adapters

            save_adapters(aset, tmp, base_model_hash=model_hash)
        (tmp / README_FILE).write_text(readme, encoding="utf-8")


def _sort_targets(file: Path) -> None:
    """List ``target_modules`` in name order: PEFT keeps them as a set, written in an order that varies
    from process to process, so the same adapter trained twice would differ in its config."""
    cfg = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
