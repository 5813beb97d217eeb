"""File formats: Hugging Face checkpoint directories, streaming writer, PEFT adapters."""
