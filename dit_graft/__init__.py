"""dit-graft: convert pretrained Diffusion Transformers into cheaper students."""

__version__ = "0.1.0"

from dit_graft import builtin  # noqa: E402, F401  (fills the operator and family registries)


def from_pretrained(path, device="cpu"):
    """Loads a dit-graft export (or a plain diffusers model directory) as a diffusers model."""
    from dit_graft.export import from_pretrained as _from_pretrained

    return _from_pretrained(path, device=device)


__all__ = ["__version__", "from_pretrained"]
