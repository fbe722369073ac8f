import json

from zorro.eval.predict import main as predict_main
from zorro.run import train

from .conftest import compose_cfg


def test_predict_on_files_names_classes_and_reports_broken_files(demo_shards, demo_videos, tmp_path, capsys):
    videos, _ = demo_videos
    cfg = compose_cfg(overrides=["model=zorro_vit_tiny", "logger=none", "data=shards", f"data.root={demo_shards}",
                                 "data.num_workers=0", "data.batch_size=2", "trainer.max_epochs=1", "test=false"],
                      output_dir=tmp_path / "run")
    train(cfg)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("last*.ckpt"))
    capsys.readouterr()  # drop the training output
    files = [str(videos / "clip 000.mp4"), str(videos / "sound 00.wav"), str(videos / "notes.mp4")]
    rc = predict_main([*files, "--ckpt", str(ckpt), "--top-k", "2", "--json", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()
    assert rc == 1  # one file failed, the others were answered
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(files[0] + ": ")
    classes = {"blue_high", "blue_low", "red_high", "red_low"}
    assert {part.split()[0] for part in lines[0].split(": ", 1)[1].split(", ")} <= classes
    assert "notes.mp4: cannot read (not_media)" in err
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved[files[2]]["error"] == "not_media" and len(saved[files[1]]) == 2
    assert 0 < sum(saved[files[0]].values()) <= 1 + 1e-6  # top-2 of a probability vector
