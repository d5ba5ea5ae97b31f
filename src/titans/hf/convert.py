"""Conversion between a titans run directory (`titans train`'s checkpoints) and a transformers directory
(`save_pretrained`: config.json, model.safetensors, generation_config.json). Both write a new directory atomically."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from titans.checkpoint import save_checkpoint
from titans.config import RunConfig
from titans.evaluate import LoadedRun, load_run
from titans.fileio import check_new_dir, save_yaml, write_new_dir
from titans.hf.configuration import TitansHFConfig
from titans.hf.modeling import TitansForCausalLM
from titans.train import CONFIG_FILE
from titans.typed_yaml import to_dict


def export_run(path: str | Path, out: str | Path) -> LoadedRun:
    """Write the model of a run directory's latest checkpoint (or of a checkpoint directory) to `out`, a new or empty
    directory, as a transformers directory (`AutoModelForCausalLM.from_pretrained(out)` after `import titans`).
    Returns the run that was exported."""
    check_new_dir(out)  # before the checkpoint is read
    run = load_run(path)
    model = TitansForCausalLM(TitansHFConfig.from_titans(run.config.model))
    model.model.load_state_dict(run.model.state_dict())
    write_new_dir(out, model.save_pretrained)
    return run


def import_run(hf_dir: str | Path, out: str | Path) -> Path:
    """Write the `TitansForCausalLM` of the local transformers directory `hf_dir` to `out`, a new or empty directory,
    as a titans run directory: config.yaml (the model's config; data, training and evaluation at their defaults, name
    `out`'s) and checkpoint step 0, which `titans generate`, `eval`, `niah` and `inspect` read. Returns `out`."""
    hf_dir, out = Path(hf_dir), check_new_dir(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found: give a local transformers directory")
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    if not isinstance(config, TitansHFConfig):
        raise ValueError(f"{hf_dir} holds a model of type {config.model_type!r}, not 'titans'")
    model = TitansForCausalLM.from_pretrained(hf_dir, config=config, local_files_only=True)
    run_config = RunConfig(model=config.to_titans(), name=out.name)

    def write(tmp: Path) -> None:
        save_yaml(run_config, tmp / CONFIG_FILE)
        save_checkpoint(tmp, 0, model.model, extra={"config": to_dict(run_config)}, keep_last=None)

    return write_new_dir(out, write)
