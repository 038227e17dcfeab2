"""``train-prompter``: UOIS-SAM's prompt generator and discriminator, trained on GT masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import events, out, table
from omnilabel.cli.options import (
    Address,
    AllowOutsideImages,
    BatchSize,
    Device,
    Images,
    JobDir,
    NumWorkers,
    Overwrite,
    Resume,
    job_options,
)
from omnilabel.errors import InputError


def _size_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--input-size: expected HxW such as 336x448, got {text!r}") from None
    return h, w


@app.command("train-prompter")
def train_prompter(
    coco: Annotated[Path, typer.Argument(help="Training COCO JSON with full masks (the objects to find).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The prompter file to write (e.g. prompter.pt).")],
    images: Images = None,
    val: Annotated[Path | None, typer.Option(
        help="Validation COCO JSON with full masks: each model keeps the weights of its lowest validation loss.")]
    = None,
    val_images: Annotated[Path | None, typer.Option(help="Validation image folder [default: --val's folder].")]
    = None,
    sam: Annotated[str | None, typer.Option(
        help="The SAM the prompter will prompt: vit_b, vit_l, vit_h or a path [default: the teacher's base, else "
             "vit_h]. The file is refused with any other SAM.")] = None,
    teacher: Annotated[Path | None, typer.Option(
        help="A fine-tuned teacher file (`omnilabel finetune-teacher`) to train against instead of plain SAM.")]
    = None,
    backbone: Annotated[str, typer.Option(
        help="Frozen DINOv2 of the prompt generator: dinov2-small (the paper's ViT-S/14), dinov2-base, or a local "
             "`transformers` folder.")] = "dinov2-small",
    epochs: Annotated[int, typer.Option(help="Epochs of each model (paper: 30; lr x0.1 every --step-epochs).")] = 30,
    step_epochs: Annotated[int, typer.Option(help="StepLR period in epochs (paper: 10).")] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-3; weight decay 1e-4).")] = 1e-3,
    input_size: Annotated[str, typer.Option(
        help="HxW the images are resized to for DINOv2, multiples of its patch size (paper: 336x448).")]
    = "336x448",
    sigma: Annotated[float, typer.Option(help="Sigma of the centroid Gaussians in pixels at --input-size.")] = 4.0,
    prompts_per_image: Annotated[int, typer.Option(
        help="Training prompts per image for the discriminator, a quarter on the background (paper: M = 30).")]
    = 30,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, the prompts drawn and the image order.")] = 0,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Train UOIS-SAM's prompt generator (HPG) and discriminator (HDNet) for `pseudomask --prompter`.

    HPG, a trained head on a frozen DINOv2, predicts where objects are (foreground) and their centres (a
    heatmap): its peaks become SAM point prompts, so no class list or detector is needed. HDNet, a small MLP on
    SAM's output tokens, rescores SAM's 4 masks per prompt: it picks the right granularity and rejects
    background prompts. SAM stays frozen. First every image is encoded once by DINOv2 and SAM (a per-image job:
    resumable, on Ray with --num-workers), then both models train for --epochs (AdamW, StepLR), resumable
    with --resume. Default `--batch-size`: 32 images per HPG step (the paper's); HDNet takes one image's
    prompts per step.
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.train_prompter import run_train_prompter
    from omnilabel.teachers.loading import TeacherSpec
    from omnilabel.teachers.uois import HpgConfig
    from omnilabel.teachers.uois_train import PrompterTrainConfig

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite, resume=resume)
    recipe = PrompterTrainConfig(epochs=epochs, lr=lr, step_epochs=step_epochs, prompts_per_image=prompts_per_image,
                                 seed=seed)
    hpg = HpgConfig(input_hw=_size_hw(input_size), sigma_px=sigma)
    spec = TeacherSpec(sam=sam, teacher=None if teacher is None else str(teacher), detector="none", device=device)
    with events("train-prompter") as on_event:
        summary = run_train_prompter(
            Dataset(coco, images, allow_outside_images), output,
            val=None if val is None else Dataset(val, val_images, allow_outside_images), teachers=spec,
            backbone=backbone, hpg=hpg, recipe=recipe, job=job, on_event=on_event)
    last = summary["history"][-1] if summary["history"] else None
    rows = [("training images (validation)", f"{summary['images']['train']} ({summary['images']['val']})"),
            ("GT instances", str(summary["instances"])),
            ("epochs (resumed at)", f"{summary['epochs']} ({summary['start_epoch']})")]
    if last is not None:
        rows.append(("last training loss HPG / HDNet", f"{last['train']['hpg']:.4f} / {last['train']['hdnet']:.4f}"))
    for name, label in (("hpg", "HPG"), ("hdnet", "HDNet")):
        if summary["best"] and summary["best"][name]:
            b = summary["best"][name]
            rows.append((f"best {label} (validation loss)", f"epoch {b['epoch']} ({b['val_loss']:.4f})"))
    if summary["errors"]:
        rows.append(("images that failed", str(summary["errors"])))
    rows += [("job directory", summary["job_dir"]), ("wall time", f"{summary['wall_s']:.1f} s")]
    out.print(table(f"wrote {summary['output']}", rows))
