"""The generated download/extract rules, run by Snakemake on sources that need no network.

A ``manual`` source stands in for an unreachable one: its job fails with the by-hand instructions,
and once the file is placed the workflow extracts it exactly once.
"""

import subprocess
import sys
import zipfile

import yaml
from workflow_copy import copy_workflow, snakemake_env


def snakemake(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "downloads", "--cores", "1", *args],
                          cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=300)


def test_manual_archive_fails_with_instructions_then_is_extracted_once(tmp_path):
    root = copy_workflow(tmp_path)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["downloads"] = {"photo-archive": {"manual": "Ask the data owner for photos.zip.",
                                             "dest": "resources/photos.zip", "extract": "resources/photos"}}
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))

    failed = snakemake(root)
    assert failed.returncode != 0
    log = (root / "logs/download/photo-archive.log").read_text()
    assert "photo-archive: no public download. Ask the data owner for photos.zip. Place it at resources/photos.zip" in log

    (root / "resources").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "resources/photos.zip", "w") as handle:
        handle.writestr("val2014/a.jpg", b"jpg")
    first = snakemake(root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (root / "resources/photos/val2014/a.jpg").read_bytes() == b"jpg"
    second = snakemake(root)
    assert "Nothing to be done" in second.stdout + second.stderr
