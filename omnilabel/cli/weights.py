"""``omnilabel weights``: a sub-app — ``list``, ``download NAME``, ``path NAME``, ``init-sam FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import events, out
from omnilabel.errors import InputError

weights_app = typer.Typer(
    name="weights", no_args_is_help=True, rich_markup_mode="markdown",
    help="List, download or locate the model weights omnilabel uses; or write a new, untrained SAM.\n\n"
         "Weights live in `$OMNILABEL_CACHE` (default `~/.cache/omnilabel`). Set `OMNILABEL_OFFLINE=1` to forbid "
         "downloads; a missing file then fails with the path to put it at.")
app.add_typer(weights_app)

#: Defaults of `weights init-sam`: the architecture of the example teacher (examples/teacher/train.sh).
_ARCH = {"embed_dim": 128, "depth": 4, "num_heads": 4, "global_attn": "1,3", "window_size": 8,
         "patch_size": 8, "image_size": 128, "prompt_dim": 128}

Name = Annotated[str, typer.Argument(help="A weight name from `omnilabel weights list`.")]


@weights_app.command("list")
def list_() -> None:
    """Every named weight: its kind, whether it is cached, what it is."""
    from rich.table import Table

    from omnilabel.models.registry import cache_dir, is_cached, list_weights

    table = Table(title=f"weights (cache: {cache_dir()})")
    for col in ("name", "kind", "cached", "description"):
        table.add_column(col)
    for spec in list_weights():
        table.add_row(spec.name, spec.kind, "yes" if is_cached(spec.name) else "no", spec.description)
    out.print(table)


@weights_app.command()
def download(
    name: Name,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if cached.")] = False,
) -> None:
    """Download a named weight into the cache (checksum verified) and print where it is."""
    from omnilabel.models.registry import download as fetch

    with events("download") as on_event:
        path = fetch(name, force=force, on_event=on_event)
    out.print(str(path))


@weights_app.command()
def path(name: Name) -> None:
    """Print where a named weight lives in the cache (whether or not it is there yet)."""
    from omnilabel.models.registry import weight_path

    out.print(str(weight_path(name)))


@weights_app.command("init-sam")
def init_sam(
    file: Annotated[Path, typer.Argument(help="The SAM checkpoint to write (.pth, Meta's format).")],
    embed_dim: Annotated[int, typer.Option(help="ViT width.")] = _ARCH["embed_dim"],
    depth: Annotated[int, typer.Option(help="ViT blocks.")] = _ARCH["depth"],
    num_heads: Annotated[int, typer.Option(help="Attention heads.")] = _ARCH["num_heads"],
    global_attn: Annotated[str, typer.Option(
        help="Comma-separated blocks with global attention (the others use windows).")] = _ARCH["global_attn"],
    window_size: Annotated[int, typer.Option(help="Attention window side in patches.")] = _ARCH["window_size"],
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels.")] = _ARCH["patch_size"],
    image_size: Annotated[int, typer.Option(help="Input side in pixels.")] = _ARCH["image_size"],
    prompt_dim: Annotated[int, typer.Option(
        help="Width of the prompt encoder and mask decoder (256 in Meta's SAMs).")] = _ARCH["prompt_dim"],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a new, untrained SAM to train from scratch.

    The architecture comes from the flags (default: the example teacher's, 2.6 M parameters at 128 px); train
    it with `omnilabel finetune-teacher --sam FILE.pth --train-encoder` (examples/teacher/train.sh is the
    example teacher's recipe).
    """
    from omnilabel.models.sam_loader import SamArch, init_sam_checkpoint

    try:
        globals_ = tuple(int(v) for v in global_attn.split(",") if v.strip())
    except ValueError as e:
        raise InputError(f"--global-attn: expected comma-separated block numbers, got {global_attn!r}") from e
    arch = SamArch(embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=globals_,
                   window_size=window_size if len(globals_) < depth else 0, patch_size=patch_size,
                   image_size=image_size, out_chans=prompt_dim)
    written = init_sam_checkpoint(arch, file, seed=seed)
    out.print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MB, untrained)")
