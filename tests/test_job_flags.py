"""The job flags: one help and one validation in every job command (they all come from ``JobOptions``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main
from cli_runner import run_in_process as run

from omnilabel.cli import app
from omnilabel.errors import InputError
from omnilabel.jobs.options import JobOptions

#: Every job command, with the arguments it needs to parse (the files need not exist: flags fail first).
JOB_COMMANDS = {
    "pseudomask": ["weak.json"],
    "predict": ["run", "--images", "images"],
    "finetune-teacher": ["coco.json"],
    "train-student": ["coco.json", "-o", "run"],
    "uncertainty": ["pseudo.json", "--refiner", "r.pt"],
    "entities": ["--images", "images"],
    "stability": ["coco.json"],
}
#: The job flags; a trainer writes into its run directory, so train-student's is its ``-o``, not ``--job-dir``.
FLAGS = ["--num-workers", "--address", "--device", "--batch-size", "--job-dir", "--overwrite"]
NOT_TAKEN = {("train-student", "--job-dir")}


def _options(name: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    command = group.commands[name]  # type: ignore[attr-defined]
    return {opt: param for param in command.params for opt in getattr(param, "opts", [])}


def test_every_job_command_takes_the_job_flags_with_one_help_and_default():
    for flag in FLAGS:
        seen = {}
        for name in JOB_COMMANDS:
            params = _options(name)
            if (name, flag) in NOT_TAKEN:
                assert flag not in params, (name, flag)
                continue
            assert flag in params, (name, flag)
            seen[name] = (params[flag].help, params[flag].default)
        assert len(set(seen.values())) == 1, (flag, seen)
    assert all("--resume" in _options(name) for name in ("finetune-teacher", "train-student"))


BAD = [
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--address", "auto", "--num-workers", "0"], "cannot be combined with --address"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA here, or not 100 GPUs
]


@pytest.mark.parametrize("name", list(JOB_COMMANDS))
@pytest.mark.parametrize(("flags", "message"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_job_flags_fail_the_same_way_everywhere_before_anything_is_read(capsys, tmp_path, monkeypatch, name,
                                                                          flags, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, name, *JOB_COMMANDS[name], *flags)
    assert code == 1 and message in err and "Traceback" not in err, err
    assert list(Path(tmp_path).iterdir()) == []


def test_a_trainer_needs_a_global_batch_its_workers_can_share():
    JobOptions(num_workers=2).check_global_batch(8)
    with pytest.raises(InputError, match="multiple of --num-workers 2"):
        JobOptions(num_workers=2).check_global_batch(5)
    with pytest.raises(InputError, match="--resume"):
        JobOptions(resume=True, overwrite=True)


def test_default_workers_run_in_this_process_on_a_cpu():
    assert JobOptions().workers == 0 and JobOptions().in_process
    assert JobOptions(num_workers=3).workers == 3
    assert JobOptions(address="ray://head:10001").workers >= 1
