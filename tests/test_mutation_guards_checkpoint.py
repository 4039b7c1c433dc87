"""Checkpoint selection, publish, rotation and manifests on real directories: only complete
checkpoints are resumed, corrupt ones are skipped and named, a failed save says what is intact
(scripts/mutation.py, area checkpoint)."""
from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil

import pytest

from forgelab import manifest
from forgelab.config import ConfigError, RunError
from forgelab.train import checkpoint as ckpt

NOT_VERIFIED = f"no {manifest.NAME}, not verified"


def make_ckpt(run_dir, step, marker=True, files=None, manifest_hash=None):
    d = run_dir / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name, data in (files or {"model.bin": b"w" * 10}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    if marker:
        (d / ckpt.MARKER).write_text(json.dumps({"global_step": step}))
    if manifest_hash:
        manifest.write_manifest(d, hash=manifest_hash)
    return d


def flip(path):
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


def test_latest_checkpoint_skips_one_without_its_marker(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 5)
    make_ckpt(tmp_path, 10)
    make_ckpt(tmp_path, 12, marker=False)
    (tmp_path / "checkpoint-14").write_text("a file, not a checkpoint")
    make_ckpt(tmp_path, "7-old")
    weird = tmp_path / "checkpoint-16"
    (weird / ckpt.MARKER).mkdir(parents=True)  # the marker must be a file
    assert ckpt.complete_checkpoints(tmp_path) == [(2, tmp_path / "checkpoint-2"), (5, tmp_path / "checkpoint-5"),
                                                   (10, tmp_path / "checkpoint-10")]
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name
    assert ckpt.latest(tmp_path / "missing") is None and ckpt.complete_checkpoints(tmp_path / "missing") == []
    assert ckpt.complete_checkpoints(str(tmp_path))[0][0] == 2


def test_staging_dirs_are_listed_and_cleaned(tmp_path):
    assert ckpt.staging_path(tmp_path, 5) == tmp_path / ".staging-checkpoint-5"
    assert ckpt.staging_path(str(tmp_path), 5) == tmp_path / ".staging-checkpoint-5"
    for step in (9, 3):
        (ckpt.staging_path(tmp_path, step) / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / ".staging-note").write_text("a file")
    make_ckpt(tmp_path, 1)
    assert ckpt.staging_dirs(str(tmp_path)) == [tmp_path / ".staging-checkpoint-3", tmp_path / ".staging-checkpoint-9"]
    assert ckpt.staging_dirs(tmp_path / "missing") == []
    assert ckpt.clean_staging(tmp_path) == [".staging-checkpoint-3", ".staging-checkpoint-9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-note", "checkpoint-1"]
    assert ckpt.clean_staging(tmp_path) == []
    # an entry that cannot be removed (a link) must not stop the next start
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".staging-checkpoint-7").symlink_to(tmp_path / "elsewhere")
    ckpt.clean_staging(tmp_path)


def test_publish_replaces_an_earlier_save_of_the_same_step(tmp_path):
    final = make_ckpt(tmp_path, 4, files={"old.bin": b"old"})
    staging = ckpt.staging_path(tmp_path, 4)
    make_ckpt(staging, 4, files={"new.bin": b"new"})
    ckpt.publish(staging, final)
    assert sorted(p.name for p in final.iterdir()) == sorted([ckpt.MARKER, "new.bin"])
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    staging2 = ckpt.staging_path(tmp_path, 6)
    make_ckpt(staging2, 6)
    ckpt.publish(staging2, tmp_path / "checkpoint-6")
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint-6" and not staging2.exists()


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for s in (1, 2, 3, 4):
        make_ckpt(tmp_path, s)
    make_ckpt(tmp_path, 5, marker=False)
    assert ckpt.rotate(tmp_path, 0) == [] and len(ckpt.complete_checkpoints(tmp_path)) == 4
    assert ckpt.rotate(tmp_path, -1) == [] and len(ckpt.complete_checkpoints(tmp_path)) == 4
    assert ckpt.rotate(tmp_path, 9) == []
    assert ckpt.rotate(tmp_path, 2) == ["checkpoint-1", "checkpoint-2"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4] and (tmp_path / "checkpoint-5").exists()
    assert ckpt.rotate(tmp_path, 1) == ["checkpoint-3"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / ckpt.MARKER).write_text("{}")
    (tmp_path / "checkpoint-0").symlink_to(tmp_path / "elsewhere")  # cannot be removed: rotation goes on
    ckpt.rotate(tmp_path, 1)
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint-4"


def test_step_of_reads_only_checkpoint_names(tmp_path):
    assert ckpt.step_of("checkpoint-12") == 12 and ckpt.step_of(tmp_path / "checkpoint-3") == 3
    assert ckpt.step_of("final") is None and ckpt.step_of("checkpoint-3x") is None


def test_check_verifies_against_the_manifest(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.VERIFIED_ENV, raising=False)
    plain = make_ckpt(tmp_path, 1)
    assert ckpt.check(plain) == (True, NOT_VERIFIED)
    good = make_ckpt(tmp_path, 2, manifest_hash="sha256")
    assert ckpt.check(good) == (True, "verified against its manifest")
    bad = make_ckpt(tmp_path, 3, files={"a.bin": b"aaaa", "b.bin": b"bbbb"}, manifest_hash="sha256")
    flip(bad / "a.bin")
    (bad / "b.bin").unlink()
    assert ckpt.check(bad) == (False, "a.bin has other contents than when it was saved (sha256 differs); "
                                      "b.bin is missing")
    monkeypatch.setenv(ckpt.VERIFIED_ENV, str(bad))  # the driver verified it already
    assert ckpt.check(bad) == (True, "verified by the launching process")
    assert ckpt.check(good) == (True, "verified against its manifest")


def test_resume_none_starts_fresh(tmp_path):
    make_ckpt(tmp_path, 1)
    for word in ("none", "", "false", "no"):
        assert ckpt.resolve_resume(word, tmp_path, lambda p: tmp_path / p) == \
            (None, "fresh start (checkpoint.resume = none)")


def test_auto_resume_takes_the_newest_that_verifies_and_names_the_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.VERIFIED_ENV, raising=False)
    assert ckpt.resolve_resume("auto", tmp_path, None) == \
        (None, f"fresh start: checkpoint.resume = auto found no complete checkpoint in {tmp_path}")
    make_ckpt(tmp_path, 2, manifest_hash="sha256")
    newest = make_ckpt(tmp_path, 4, manifest_hash="sha256")
    assert ckpt.resolve_resume("auto", tmp_path, None) == \
        (newest, f"resuming from {newest} (checkpoint.resume = auto: latest complete checkpoint, "
                 "verified against its manifest)")
    flip(newest / "model.bin")
    path, msg = ckpt.resolve_resume("auto", tmp_path, None)
    assert path == tmp_path / "checkpoint-2"
    assert msg == (f"resuming from {path} (checkpoint.resume = auto: latest complete checkpoint, verified against "
                   "its manifest); skipped checkpoint-4 (model.bin has other contents than when it was saved "
                   "(sha256 differs))")
    sha = "model.bin has other contents than when it was saved (sha256 differs)"
    newer = make_ckpt(tmp_path, 6, manifest_hash="sha256")
    flip(newer / "model.bin")
    assert ckpt.resolve_resume("auto", tmp_path, None)[1].endswith(
        f"; skipped checkpoint-6 ({sha}); checkpoint-4 ({sha})")
    shutil.rmtree(newer)
    flip(tmp_path / "checkpoint-2" / "model.bin")
    with pytest.raises(ConfigError) as e:
        ckpt.resolve_resume("auto", tmp_path, None)
    assert str(e.value) == (f"key 'checkpoint.resume': auto found no checkpoint in {tmp_path} that matches its "
                            f"manifest: checkpoint-4 ({sha}); checkpoint-2 ({sha}); start over with "
                            "checkpoint.resume=none and checkpoint.overwrite=true, or point checkpoint.resume at "
                            "a good copy")


def test_resume_from_a_path_takes_that_checkpoint_or_the_newest_in_a_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.VERIFIED_ENV, raising=False)
    run = tmp_path / "run"
    one = make_ckpt(run, 1)
    three = make_ckpt(run, 3, manifest_hash="size")
    resolve = lambda p: tmp_path / p  # noqa: E731 - the project root is tmp_path here
    assert ckpt.resolve_resume("run/checkpoint-1", tmp_path / "other", resolve) == \
        (one, f"resuming from {one} (checkpoint.resume = path, {NOT_VERIFIED})")
    assert ckpt.resolve_resume("run", tmp_path / "other", resolve) == \
        (three, f"resuming from {three} (latest complete checkpoint in {run}, verified against its manifest)")
    (three / "model.bin").write_bytes(b"short")
    with pytest.raises(ConfigError) as e:
        ckpt.resolve_resume("run", tmp_path / "other", resolve)
    assert str(e.value) == (f"key 'checkpoint.resume': {three} does not match its manifest: model.bin has 5 bytes, "
                            "the manifest says 10")
    with pytest.raises(ConfigError) as e:
        ckpt.resolve_resume("nothing", tmp_path, resolve)
    assert str(e.value) == (f"key 'checkpoint.resume': {tmp_path / 'nothing'} is neither a complete checkpoint "
                            f"(no {ckpt.MARKER}) nor a run dir holding one")


def _free(run_dir):
    return rf"\(\d[\d,]* MiB free on {re.escape(str(run_dir))}\)"


def test_the_free_space_is_given_in_mib(tmp_path):
    msg = ckpt.save_failure(tmp_path / "checkpoint-1", ValueError("v"))
    mib = int(re.search(r"\(([\d,]+) MiB free on ", msg).group(1).replace(",", ""))
    assert abs(mib - shutil.disk_usage(tmp_path).free / 2**20) < 256


def test_a_full_disk_is_named_and_the_intact_checkpoints_listed(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 3)
    target = tmp_path / "checkpoint-4"
    msg = ckpt.save_failure(target, OSError(errno.ENOSPC, "No space left on device"))
    assert re.fullmatch(r"checkpoint-4 could not be saved: the disk is full \(no space left on device\) "
                        + _free(tmp_path) + r"; the unfinished save was removed, checkpoint-2, checkpoint-3 intact",
                        msg), msg
    # torch's writer: 'unexpected pos', with the ENOSPC OSError as its cause or context
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError as inner:
            raise RuntimeError("unexpected pos 64") from inner
    except RuntimeError as e:
        assert "the disk is full" in ckpt.save_failure(target, e)
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError:
            raise RuntimeError("unexpected pos 64")
    except RuntimeError as e:
        assert "the disk is full" in ckpt.save_failure(target, e)
    assert "the disk is full" in ckpt.save_failure(target, RuntimeError("write: No space left"))


def test_another_save_failure_keeps_its_own_words(tmp_path):
    target = tmp_path / "checkpoint-4"
    msg = ckpt.save_failure(target, ValueError("x" * 400))
    assert re.fullmatch(r"checkpoint-4 could not be saved: ValueError: " + "x" * 300 + " " + _free(tmp_path)
                        + "; the unfinished save was removed, no earlier checkpoint exists", msg), msg
    assert "OSError: [Errno 5] io" in ckpt.save_failure(target, OSError(errno.EIO, "io"))
    gone = tmp_path / "gone" / "checkpoint-1"
    assert ckpt.save_failure(gone, ValueError("v")) == (
        f"checkpoint-1 could not be saved: ValueError: v (free space of {gone.parent} unknown); the unfinished "
        "save was removed, no earlier checkpoint exists")


def test_manifest_records_every_file_with_size_and_sha256(tmp_path):
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"abc")
    (d / "sub" / "b.txt").write_bytes(b"")
    (d / f".{manifest.NAME}.tmp1").write_text("a temp file of an interrupted write")
    body = manifest.write_manifest(str(d))
    assert body == {"format": "forgelab-manifest-1", "hash": "sha256", "files": {
        "a.bin": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
        "sub/b.txt": {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}}}
    assert json.loads((d / manifest.NAME).read_text(encoding="utf-8")) == body
    assert sorted(p.name for p in d.iterdir()) == [f".{manifest.NAME}.tmp1", "a.bin", manifest.NAME, "sub"]
    again = manifest.write_manifest(d, hash="size")  # the manifest never lists itself
    assert again["files"] == {"a.bin": {"bytes": 3}, "sub/b.txt": {"bytes": 0}} and again["hash"] == "size"
    big = tmp_path / "big"
    big.mkdir()
    data = bytes(range(256)) * (40 * 1024 + 7)  # over one read chunk
    (big / "w.bin").write_bytes(data)
    assert manifest.write_manifest(big)["files"]["w.bin"] == {"bytes": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_names_missing_resized_and_changed_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert manifest.verify(d) == ("none", [])
    (d / "big.bin").write_bytes(b"x" * 1500)
    (d / "same.bin").write_bytes(b"y" * 8)
    (d / "gone.bin").write_bytes(b"z")
    manifest.write_manifest(d)
    assert manifest.verify(str(d)) == ("ok", [])
    (d / "big.bin").write_bytes(b"x" * 1200)
    flip(d / "same.bin")
    (d / "gone.bin").unlink()
    (d / "new.bin").write_bytes(b"files the manifest does not list are not checked")
    assert manifest.verify(d) == ("bad", ["big.bin has 1,200 bytes, the manifest says 1,500",
                                          "gone.bin is missing",
                                          "same.bin has other contents than when it was saved (sha256 differs)"])


def test_a_size_manifest_catches_truncation_not_bit_flips(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "w.bin").write_bytes(b"0123456789")
    manifest.write_manifest(d, hash="size")
    flip(d / "w.bin")
    assert manifest.verify(d) == ("ok", [])
    (d / "w.bin").write_bytes(b"0123")
    assert manifest.verify(d) == ("bad", ["w.bin has 4 bytes, the manifest says 10"])


def test_an_unreadable_manifest_is_bad(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / manifest.NAME).write_text("{not json", encoding="utf-8")
    status, problems = manifest.verify(d)
    assert status == "bad" and len(problems) == 1
    assert problems[0].startswith(f"{manifest.NAME} is unreadable (JSONDecodeError: ")
    (d / manifest.NAME).write_text(json.dumps({"format": "forgelab-manifest-1"}), encoding="utf-8")
    assert manifest.verify(d) == ("bad", [f"{manifest.NAME} is unreadable (KeyError: 'files')"])


def test_require_intact_refuses_a_corrupt_model_dir(tmp_path):
    d = tmp_path / "final"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    assert manifest.require_intact(d, "model") == "no manifest"
    manifest.write_manifest(d)
    assert manifest.require_intact(d, "model") == "verified against its manifest"
    (d / "config.json").write_text("{}")
    manifest.write_manifest(d)
    flip(d / "model.safetensors")
    (d / "config.json").unlink()
    with pytest.raises(RunError) as e:
        manifest.require_intact(d, "adapter")
    assert str(e.value) == (f"adapter {d} does not match its {manifest.NAME}: config.json is missing; "
                            "model.safetensors has other contents than when it was saved (sha256 differs); it is "
                            "corrupt or was changed after it was saved")


def test_the_private_api_check_names_each_change():
    from transformers import Trainer

    from forgelab.train import hf_private

    class Gone:  # a release without either method
        pass
    assert hf_private.check(Gone) == ["transformers.Trainer._save_checkpoint is gone",
                                      "transformers.Trainer._get_output_dir is gone"]

    class Reshaped(Trainer):
        def _get_output_dir(self, trial, extra):
            return super()._get_output_dir(trial)
    assert hf_private.check(Reshaped) == [
        "transformers.Trainer._get_output_dir('self', 'trial', 'extra') no longer takes ('self', 'trial')"]

    class Between(Trainer):  # a library trainer between the lab's mixins and Trainer
        def _save_checkpoint(self, model, trial):
            return None

        def _get_output_dir(self, trial=None):
            return super()._get_output_dir(trial)

    class Lab(Between):
        pass
    assert hf_private.check(Lab) == [f"{__name__}.Between._save_checkpoint no longer calls Trainer's"]

    class LabSide(Trainer):  # the lab's own mixins come first in the MRO and are skipped
        def _save_checkpoint(self, model, trial):
            return None
    LabSide.__module__ = "forgelab.train.fake"

    class Both(LabSide, Between):
        pass
    assert hf_private.check(Both) == [f"{__name__}.Between._save_checkpoint no longer calls Trainer's"]
    Between.__module__ = "forgelab.train.fake"
    assert hf_private.check(Lab) == [] and hf_private.check(Both) == []


@pytest.mark.parametrize("files", [[], {"model.safetensors": 12}, "x"])
def test_a_manifest_with_malformed_files_counts_as_corrupt_not_a_crash(tmp_path, files):
    from forgelab import manifest
    (tmp_path / manifest.NAME).write_text(json.dumps({"files": files}))
    status, problems = manifest.verify(tmp_path)
    assert status == "bad" and "malformed" in problems[0]
