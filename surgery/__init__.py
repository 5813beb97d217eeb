"""surgery: checkpoint surgery so parameter-efficient adapters can move between models.

The package is a library first; `surgery.cli` is a thin Typer layer over it. Importing
`surgery` must stay cheap (no torch, no transformers) so `surgery --help` is instant: the API
functions below (surgery.api, README "Python API") are imported on first use.

    import surgery
    surgery.merge_lora("base", ["adapter"], "merged")
    report = surgery.extract_lora("base", "tuned", "adapter", rank=16)
"""

__version__ = "0.1.0"

__all__ = ["inspect", "merge_lora", "unmerge_lora", "extract_lora", "extract_krona", "extract_bitfit",
           "apply_bitfit", "prune_bridge", "transfer", "train", "tune_bridge", "evaluate"]


def __getattr__(name: str):
    # `surgery.train` is also a subpackage: importing it makes it this attribute, so the package
    # itself is callable (surgery/train/__init__.py) and this hook serves every other name
    if name in __all__:
        from .api import resolve

        value = resolve(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
