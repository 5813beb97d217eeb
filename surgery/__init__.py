"""surgery: checkpoint surgery so parameter-efficient adapters can move between models.

The package is a library first; `surgery.cli` is a thin Typer layer over it. Importing
`surgery` must stay cheap (no torch, no transformers) so `surgery --help` is instant.
"""

__version__ = "0.1.0"
