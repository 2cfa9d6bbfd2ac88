"""The command line, the README's commands as written, and the C++ RLE decoder."""
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as coco

from conftest import REPO
from earthgptx.data import templates as T
from earthgptx.evaluation import metrics as M

SAR = "../shared/data/sar/hrsid/P0094_0_800_3000_3800.png"


def egx(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "egx", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_paper_counts_without_weights():
    out = json.loads(egx("info", "--preset", "paper", "--json").stdout)
    assert out["preset"] == "paper"
    p = out["parameters"]
    assert set(p) == {"total", "vision_encoder", "prompt_encoder", "llm", "pixel_decoder"}
    assert 13e9 <= p["total"] <= 15e9


def test_predict_json_contract(data_root):
    out = json.loads(egx("predict", "--preset", "tiny", "--image", SAR, "--modality", "sar", "--text",
                         "Segment the ship.", "--point", "400,400", "--box", "100,100,300,260",
                         "--max-new-tokens", "3", "--json").stdout)
    assert {"text", "boxes", "masks", "scores", "timings_ms"} <= set(out)
    assert out["masks"] and all(m["size"] == [800, 800] for m in out["masks"])
    decoded = coco.decode(out["masks"][0])
    assert decoded.shape == (800, 800)
    assert len(out["scores"]) == len(out["masks"]) and all(len(b) == 4 for b in out["boxes"])
    assert {"vision_encoder", "prompt_encoder", "llm", "pixel_decoder"} <= set(out["timings_ms"])


def test_click_needs_no_text_and_masks_can_be_counts_or_files(tmp_path, data_root):
    """``--task click`` without ``--text``; ``--masks none`` keeps only pixel counts; ``--masks
    DIR`` writes PNGs equal to the RLE masks; any other task without ``--text`` is refused."""
    import cv2

    base = ["predict", "--preset", "tiny", "--image", SAR, "--modality", "sar", "--point", "346,323", "--task",
            "click", "--json"]
    rle = json.loads(egx(*base).stdout)
    counts = json.loads(egx(*base, "--masks", "none").stdout)
    files = json.loads(egx(*base, "--masks", str(tmp_path / "m")).stdout)
    assert "masks" not in counts and "masks" not in files and rle["masks"]
    want = [coco.decode(m).astype(bool) for m in rle["masks"]]
    assert counts["mask_pixels"] == files["mask_pixels"] == [int(m.sum()) for m in want]
    for path, m in zip(files["mask_files"], want):
        np.testing.assert_array_equal(cv2.imread(path, cv2.IMREAD_GRAYSCALE) > 0, m)
    proc = egx("predict", "--preset", "tiny", "--image", SAR, "--modality", "sar", check=False)
    assert proc.returncode == 2 and "--text is needed" in proc.stderr and "--task click" in proc.stderr


def test_a_far_larger_image_is_warned_about(tmp_path, data_root):
    import cv2

    big = cv2.resize(cv2.imread(SAR), (2400, 2400))
    cv2.imwrite(str(tmp_path / "big.png"), big)
    proc = egx("predict", "--preset", "tiny", "--image", str(tmp_path / "big.png"), "--modality", "sar", "--task",
               "click", "--point", "1000,1000", "--masks", "none", "--json", "--no-zoom")
    assert "warning: the image is 2400x2400 px" in proc.stderr and "smaller" in proc.stderr
    # zoomed (the default with a prompt): the window around the click is said instead
    proc = egx("predict", "--preset", "tiny", "--image", str(tmp_path / "big.png"), "--modality", "sar", "--task",
               "click", "--point", "1000,1000", "--masks", "none", "--json")
    assert "warning" not in proc.stderr
    assert "note: answering on the 256x256 px window at (896, 896) around the prompts" in proc.stderr
    cv2.imwrite(str(tmp_path / "crop.png"), big[:500, :500])  # within 4x the tiny model's 128 px input
    proc = egx("predict", "--preset", "tiny", "--image", str(tmp_path / "crop.png"), "--modality", "sar", "--task",
               "click", "--point", "300,300", "--masks", "none", "--json")
    assert "warning" not in proc.stderr


def test_overlay_marks_the_prompts():
    from earthgptx.overlay import PROMPT_COLOUR, draw_overlay
    from earthgptx.processing import VisualPrompts

    rgb = np.full((200, 300, 3), 60, np.uint8)
    plain = draw_overlay(rgb, {"masks": [], "boxes": []})
    np.testing.assert_array_equal(plain, rgb)
    marked = draw_overlay(rgb, {"masks": [], "boxes": []}, VisualPrompts([(50, 60)], [(120, 30, 260, 150)], []))
    assert tuple(marked[60, 50]) == PROMPT_COLOUR  # the point's cross
    white = (marked == PROMPT_COLOUR).all(-1)
    assert 0.4 < white[30, 120:260].mean() < 1 and 0.4 < white[30:150, 259].mean() < 1  # dashed box edges
    assert (marked[100:140, 150:230] == 60).all()  # inside the box: untouched


def test_scribble_prompt(tmp_path, data_root):
    import cv2

    scribble = np.zeros((800, 800), np.uint8)
    cv2.line(scribble, (100, 100), (300, 220), 255, 3)
    cv2.imwrite(str(tmp_path / "s.png"), scribble)
    out = json.loads(egx("predict", "--preset", "tiny", "--image", SAR, "--modality", "sar", "--text",
                         "Segment <region1>.", "--scribble", str(tmp_path / "s.png"), "--max-new-tokens", "2",
                         "--json").stdout)
    assert out["task"] == "segment" and out["masks"][0]["size"] == [800, 800]


@pytest.mark.parametrize("args, message", [
    (["--image", "nope.png", "--modality", "sar", "--text", "x"], "not found"),
    (["--image", SAR, "--modality", "sar", "--text", "x", "--point", "900,10"], "outside"),
    (["--image", "../shared/data/infrared/sirst/images/Misc_1.png", "--modality", "optical", "--text", "x"],
     "needs 3 bands"),
])
def test_bad_input_exits_2_with_a_message(args, message, data_root):
    proc = egx("predict", "--preset", "tiny", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_point_is_an_argument_error():
    proc = egx("predict", "--preset", "tiny", "--image", SAR, "--modality", "sar", "--text", "x", "--point", "4",
               check=False)
    assert proc.returncode == 2 and "X,Y" in proc.stderr


def _readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip()]


def _readme_folder(tmp_path, data_root) -> tuple:
    """(cwd, env, ports) for the README's commands: a temporary folder laid out like the
    repository for their relative paths (``engines/``, ``export/`` and ``earthgptx/`` (the
    sample images) link to the repository's, ``../shared`` to the data), so that what they write (``keys/``, the
    overlay) stays out of the repository; this checkout's code first on the path; and
    free ports in place of the README's 5555 and 5556 (another suite may run beside)."""
    import os
    import socket

    work = tmp_path / "repo"
    work.mkdir()
    for name in ("engines", "export", "earthgptx"):
        (work / name).symlink_to(REPO / name)
    (tmp_path / "shared").symlink_to(data_root.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    ports = {}
    for readme_port in ("5555", "5556"):
        with socket.socket() as s:  # the kernel's choice of a free port
            s.bind(("127.0.0.1", 0))
            ports[readme_port] = str(s.getsockname()[1])
    return work, env, ports


def _start_server(cmd: list[str], cwd, env) -> subprocess.Popen:
    """A README line ending in ``&`` (``egx serve``): start it, return once it serves."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    line = ""
    while "egx serve:" not in line and proc.poll() is None:
        line = proc.stderr.readline()
    assert proc.poll() is None, f"{cmd} exited: {proc.stderr.read()[-2000:]}"
    return proc


@pytest.mark.slow
def test_readme_commands_run_as_written(data_root, tmp_path):
    """Every ``egx`` and build command in the README's bash blocks, as written but in a
    temporary folder and on free ports (a line ending in ``&`` runs in the background until
    the end). The install and the test
    command themselves are run by ``.ci/run`` (running pytest here would recurse)."""
    commands = _readme_commands()
    assert any("python export/build_engines.py" in c for c in commands)
    assert any("egx predict --engines engines/default" in c for c in commands)
    assert any(c.startswith("egx serve") for c in commands) and any(c.startswith("egx query") for c in commands)
    mstar = [T.readable_class(d.name) for d in (data_root / "sar" / "mstar").iterdir() if d.is_dir()]
    ran, background = 0, []
    cwd, env, ports = _readme_folder(tmp_path, data_root)
    try:
        for line in commands:
            for part in line.split(" && "):
                argv = shlex.split(part)
                for readme_port, port in ports.items():
                    argv = [a.replace(f":{readme_port}", f":{port}") for a in argv]
                if argv[:2] == ["python", "export/build_engines.py"]:
                    cmd = [sys.executable, *argv[1:]]
                elif argv[0] == "egx":
                    egx_path = shutil.which("egx")
                    assert egx_path, "the egx console script is not installed (pip install -e .)"
                    cmd = [egx_path, *argv[1:]]
                elif argv[0] in ("mkdir", "cp"):
                    cmd = argv
                else:
                    assert argv[:2] in (["pip", "install"], ["python", "-m"]), part
                    continue
                if cmd[-1] == "&":
                    background.append(_start_server(cmd[:-1], cwd, env))
                    continue
                proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
                assert proc.returncode == 0, (part, proc.stderr[-2000:])
                if "--json" in argv and argv[1] in ("predict", "query"):
                    out = json.loads(proc.stdout)
                    if "--masks" in argv:  # counts only
                        assert "masks" not in out and len(out["mask_pixels"]) == len(out["scores"])
                    elif "classify" in argv:  # the trained default names one of MSTAR's vehicles
                        assert M.class_in_text(out["text"], mstar) is not None, out["text"]
                    elif "engines/default" in argv or "query" in argv:
                        assert out["masks"][0]["size"] == [800, 800] and out["boxes"] and "text" in out
                ran += 1
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert all(p.returncode == 0 for p in background)
    assert ran >= 8


def test_cpp_rle_decoder_matches_python(tmp_path, tiny_predictor, data_root):
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("cmake or a C++ compiler is not installed")
    from earthgptx.imageio import read_image
    from earthgptx.processing import VisualPrompts
    from earthgptx.rle import mask_to_rle

    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    subprocess.run(["ctest", "--output-on-failure"], cwd=build, check=True, capture_output=True)
    img = read_image(data_root / "sar/hrsid/P0094_0_800_3000_3800.png").data
    r = tiny_predictor.predict(img, "sar", "", VisualPrompts([(400, 400)], [], []), task="click")
    masks = r.masks + [np.random.default_rng(0).random((33, 21)) < 0.4]
    for m in masks:
        rle = mask_to_rle(m)
        pgm = subprocess.run([str(build / "egx_rle_decode"), str(rle["size"][0]), str(rle["size"][1]), rle["counts"]],
                             check=True, capture_output=True).stdout
        header_end = pgm.index(b"255\n") + 4
        decoded = np.frombuffer(pgm[header_end:], np.uint8).reshape(m.shape)
        assert np.array_equal(decoded == 255, m)
