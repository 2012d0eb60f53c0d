"""save_state is atomic and load_state verifies before loading (fastppo/checkpointing.py).

A child process killed with SIGKILL at random moments of its save_state always leaves a loadable
checkpoint: the previous one or the new one, whole (weights, optimizer, KL coefficient, moments and step
from one save). A damaged checkpoint is refused by name with the trainer untouched; each state an
interrupted swap can leave loads the right checkpoint, and the next save tidies up.
"""

import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from checkpoint_child import build, fingerprint, same
from conftest import make_batch
from fastppo import checkpointing

CHILD = os.path.join(os.path.dirname(__file__), "checkpoint_child.py")
KILLS = 18
WRITE_DELAY = 0.02  # seconds the child sleeps after each file written, flushed or renamed


def _matching(state: dict, known: dict):
    found = [number for number, candidate in known.items() if same(state, candidate)]
    assert len(found) <= 1
    return found[0] if found else None


def _on_disk(ckpt: str) -> str:
    """Which moment of the save the kill left behind (fastppo/checkpointing.py's states)."""
    staging, retired = ckpt + checkpointing.STAGING_SUFFIX, ckpt + checkpointing.RETIRED_SUFFIX
    if not os.path.exists(ckpt):
        return "between the renames"
    if os.path.exists(retired):
        return "deleting the previous"
    if os.path.exists(staging):
        complete = os.path.exists(os.path.join(staging, checkpointing.MANIFEST))
        return "manifest written" if complete else "writing"
    return "done"


class Helper:
    """tests/trainer/checkpoint_child.py, talked to line by line."""

    def __init__(self, *args):
        env = dict(os.environ, FASTPPO_TEST_WRITE_DELAY=str(WRITE_DELAY), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, CHILD, *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.watchdog = threading.Timer(150, self.process.kill)  # a hung child fails the test, not the suite
        self.watchdog.start()

    def send(self, number: int) -> None:
        self.process.stdin.write(f"{number}\n")
        self.process.stdin.flush()

    def until(self, word: str, number: int) -> list:
        line = self.process.stdout.readline().split()
        while line[:2] != [word, str(number)]:
            assert line and line[0] != "exit", f"save {number}'s child failed before '{word}' ({line}); see stderr"
            line = self.process.stdout.readline().split()
        return line[2:]

    def close(self) -> None:
        self.watchdog.cancel()
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.mark.slow
def test_kill_9_during_save_state_leaves_the_previous_or_the_new_checkpoint_whole(gpt2_dir, tokenizer_dir, tokenizer,
                                                                                  tmp_path):
    ckpt, expected = str(tmp_path / "ckpt"), tmp_path / "expected"
    expected.mkdir()
    trainer = build(gpt2_dir, tokenizer)
    trainer.step(*make_batch(tokenizer, 2, seed=0))
    trainer.save_state(ckpt)
    known, loaded = {0: fingerprint(trainer)}, 0
    rng, duration, seen = random.Random(0), None, collections.Counter()
    helper = Helper(gpt2_dir, tokenizer_dir, ckpt, str(expected))
    try:
        for number in range(1, KILLS + 2):
            helper.send(number)
            (pid,) = helper.until("saving", number)
            if duration is not None:  # the first save runs to the end: its length spreads the kills over a save
                time.sleep(rng.uniform(0, 1.2 * duration))
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            finished = helper.until("exit", number) if duration is not None else helper.until("saved", number)
            if duration is None:
                duration = float(finished[0])
                helper.until("exit", number)
            known[number] = torch.load(expected / f"{number}.pt")
            moment = _on_disk(ckpt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "cut between its two renames": expected here
                trainer.load_state(ckpt)  # there is always a complete checkpoint to load
            got = _matching(fingerprint(trainer), known)
            assert got in (loaded, number), f"save {number} killed ({moment}): loaded {got}, not {loaded} or {number}"
            seen[moment, "new" if got == number else "previous"] += 1
            loaded = got
    finally:
        helper.close()
    print(f"save takes {duration:.3f} s with the child's delays; after each kill: {dict(seen)}")
    assert sum(count for (_, which), count in seen.items() if which == "previous") >= 1, seen  # kills did cut saves


CORRUPTIONS = {  # name: (damage, the file the refusal must name)
    "truncated optimizer": (lambda d: _truncate(d, "optimizer.bin"), "optimizer.bin"),
    "flipped weight byte": (lambda d: _flip(d, "model.safetensors"), "model.safetensors"),
    "missing RNG state": (lambda d: os.remove(os.path.join(d, "random_states_0.pkl")), "random_states_0.pkl"),
    "unlisted extra file": (lambda d: shutil.copy(os.path.join(d, "optimizer.bin"), os.path.join(d, "optimizer_1.bin")),
                            "optimizer_1.bin"),
    "edited trainer state": (lambda d: _edit_kl_coef(d), checkpointing.TRAINER_STATE),
    "emptied trainer state": (lambda d: _truncate(d, checkpointing.TRAINER_STATE, 0), checkpointing.TRAINER_STATE),
    "no manifest": (lambda d: os.remove(os.path.join(d, checkpointing.MANIFEST)), checkpointing.MANIFEST),
    "unreadable manifest": (lambda d: _truncate(d, checkpointing.MANIFEST), checkpointing.MANIFEST),
}


def _truncate(directory, name, size=None):
    path = os.path.join(directory, name)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2 if size is None else size)


def _flip(directory, name):
    path = os.path.join(directory, name)
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) - 3)  # in the tensor data, not the header: still a valid file
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))


def _edit_kl_coef(directory):
    path = os.path.join(directory, checkpointing.TRAINER_STATE)
    with open(path) as handle:
        text = handle.read()
    edited = re.sub(r'"kl_coef": [0-9.e-]+', '"kl_coef": 0.5', text)
    assert edited != text
    with open(path, "w") as handle:
        handle.write(edited)


def test_damaged_checkpoint_is_refused_by_name_and_the_trainer_keeps_its_state(gpt2_dir, tokenizer, tmp_path):
    trainer = build(gpt2_dir, tokenizer)
    trainer.step(*make_batch(tokenizer, 2, seed=0))
    trainer.current_step = 1
    good = str(tmp_path / "good")
    trainer.save_state(good)
    listed = checkpointing.verify(good)["files"]
    assert checkpointing.TRAINER_STATE in listed and "optimizer.bin" in listed  # the JSON state is covered too
    saved = fingerprint(trainer)
    trainer.step(*make_batch(tokenizer, 2, seed=1))
    trainer.current_step = 2
    before = fingerprint(trainer)
    assert not same(before, saved)
    for case, (damage, bad) in CORRUPTIONS.items():
        directory = str(tmp_path / case.replace(" ", "-"))
        shutil.copytree(good, directory)
        damage(directory)
        with pytest.raises(ValueError, match=re.escape(bad)) as refused:
            trainer.load_state(directory)
        assert directory in str(refused.value), case
        assert same(fingerprint(trainer), before), f"{case}: the refused load changed the trainer"

    legacy = str(tmp_path / "legacy")  # what fastppo wrote before: no manifest; refused, then accepted once sealed
    shutil.copytree(good, legacy)
    os.remove(os.path.join(legacy, checkpointing.MANIFEST))
    with pytest.raises(ValueError, match="before checkpoints were atomic"):
        trainer.load_state(legacy)
    checkpointing.seal(legacy)
    trainer.load_state(legacy)
    assert same(fingerprint(trainer), saved)


def test_each_state_of_an_interrupted_swap_loads_a_whole_checkpoint_and_the_next_save_tidies_up(gpt2_dir, tokenizer,
                                                                                                 tmp_path):
    trainer = build(gpt2_dir, tokenizer)
    trainer.step(*make_batch(tokenizer, 2, seed=0))
    first_dir, second_dir = str(tmp_path / "first"), str(tmp_path / "second")
    trainer.save_state(first_dir)
    first = fingerprint(trainer)
    trainer.step(*make_batch(tokenizer, 2, seed=1))
    trainer.current_step = 1
    trainer.save_state(second_dir)
    second = fingerprint(trainer)

    def incomplete(path):  # a staging directory cut while writing: no manifest, a truncated file
        shutil.copytree(second_dir, path)
        os.remove(os.path.join(path, checkpointing.MANIFEST))
        _truncate(path, "optimizer.bin")

    def half_deleted(path):
        shutil.copytree(first_dir, path)
        os.remove(os.path.join(path, checkpointing.MANIFEST))
        os.remove(os.path.join(path, "model.safetensors"))

    states = {  # what is on disk: (checkpoint, staging, old) builders; which one load_state must give
        "writing": (first_dir, incomplete, None, first),
        "manifest written": (first_dir, second_dir, None, first),
        "between the renames": (None, second_dir, first_dir, second),
        "between the renames, new one damaged": (None, incomplete, first_dir, first),
        "deleting the previous": (second_dir, None, half_deleted, second),
    }
    for name, (target, staging, old, expected) in states.items():
        root = tmp_path / name.replace(" ", "-").replace(",", "")
        root.mkdir()
        ckpt = str(root / "ckpt")
        for source, path in ((target, ckpt), (staging, ckpt + checkpointing.STAGING_SUFFIX),
                             (old, ckpt + checkpointing.RETIRED_SUFFIX)):
            if callable(source):
                source(path)
            elif source is not None:
                shutil.copytree(source, path)
        on_disk = sorted(os.listdir(root))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.load_state(ckpt)
        assert same(fingerprint(trainer), expected), name
        assert any("cut between its two renames" in str(w.message) for w in caught) == (target is None), name
        assert sorted(os.listdir(root)) == on_disk, name  # loading moved nothing
        trainer.save_state(ckpt)  # finishes or undoes the swap first, then leaves the checkpoint alone
        assert os.listdir(root) == ["ckpt"], name
        trainer.load_state(ckpt)
        assert same(fingerprint(trainer), expected), name


def test_save_state_refuses_to_replace_a_directory_that_is_not_a_checkpoint(gpt2_dir, tokenizer, tmp_path):
    trainer = build(gpt2_dir, tokenizer)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a fastppo checkpoint"):
        trainer.save_state(tmp_path / "work")
    assert os.listdir(tmp_path) == ["work"] and (tmp_path / "work" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.load_state(tmp_path / "absent")
