"""Make a checkpoint's Hugging Face folder an MLflow model in place, without copying its weights.

MLflow's transformers flavour reads an `MLmodel` file naming the folder that holds the weights
(`model_binary`) and the tokenizer under `components/tokenizer`. Pointing `model_binary` at the
folder itself keeps it a plain Hugging Face folder (from_pretrained loads it as before) that is also
an MLflow model: `mlflow.transformers.load_model('models:/<name>@<alias>')`, pyfunc and
`mlflow models serve` work on the registered version. Only the tokenizer files (a few MB) are
copied, because the flavour looks for them in that subfolder.
"""

from __future__ import annotations

import platform
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "tokenizer.model")  # fmt: skip


def _requirements(*extra: str) -> list[str]:
    from importlib.metadata import version

    return [
        f"{p}=={version(p)}" for p in ("mlflow", "transformers", "torch", "safetensors", "accelerate", *extra)
    ]


def write_mlflow_model(hf_dir: Path, source: Path | None = None) -> None:
    """Add MLmodel, its environment files and components/tokenizer to a Hugging Face model folder,
    or to a LoRA adapter's folder: MLflow then loads the base model from the folder the adapter
    names (as from_pretrained does, so while it exists) and applies the adapter. `source`: where
    the folder will be once published (MLmodel names it; default: where it is)."""
    import json

    adapter_config = hf_dir / "adapter_config.json"
    base = (
        Path(json.loads(adapter_config.read_text())["base_model_name_or_path"])
        if adapter_config.is_file()
        else None
    )
    config = json.loads(((base or hf_dir) / "config.json").read_text())
    components = hf_dir / "components" / "tokenizer"
    components.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, components / name)
    requirements = _requirements("peft") if base else _requirements()
    versions = dict(r.split("==") for r in requirements)  # not `import transformers`: seconds, for a string
    (hf_dir / "requirements.txt").write_text("\n".join(requirements) + "\n")
    python = platform.python_version()
    (hf_dir / "python_env.yaml").write_text(
        yaml.safe_dump(
            {"python": python, "build_dependencies": ["pip"], "dependencies": ["-r requirements.txt"]}
        )
    )
    (hf_dir / "conda.yaml").write_text(
        yaml.safe_dump({"name": "mlflow-env", "channels": ["conda-forge"],
                        "dependencies": [f"python={python}", "pip", {"pip": requirements}]})
    )  # fmt: skip
    tok_config = hf_dir / "tokenizer_config.json"
    tokenizer_class = (
        json.loads(tok_config.read_text()).get("tokenizer_class") if tok_config.is_file() else None
    ) or "AutoTokenizer"
    size = sum(p.stat().st_size for p in hf_dir.rglob("*") if p.is_file())
    mlmodel = {
        "flavors": {
            "python_function": {
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "loader_module": "mlflow.transformers",
                "python_version": python,
            },
            "transformers": {
                "code": None,
                "components": ["tokenizer"],
                "instance_type": "TextGenerationPipeline",
                # The weights: this folder's own, or the base model's with this folder's adapter.
                **(
                    {"model_binary": "."}
                    if base is None
                    else {"local_base_model_path": str(base), "peft_adaptor": "."}
                ),
                "pipeline_model_type": (config.get("architectures") or ["AutoModelForCausalLM"])[0],
                "source_model_name": str(source or hf_dir),
                "task": "text-generation",
                "tokenizer_type": tokenizer_class,
                "torch_dtype": f"torch.{config.get('dtype') or config.get('torch_dtype') or 'float32'}",
                "transformers_version": versions["transformers"],
            },
        },
        "mlflow_version": versions["mlflow"],
        "model_size_bytes": size,
        "model_uuid": uuid.uuid4().hex,
        "signature": {
            "inputs": '[{"type": "string", "required": true}]',
            "outputs": '[{"type": "string", "required": true}]',
            "params": None,
        },
        "utc_time_created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
    }
    (hf_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel, sort_keys=False))
