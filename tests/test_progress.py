"""The build console: long steps are never silent off a terminal, and lines do not wrap."""
import io
import time


def test_status_off_a_terminal_prints_heartbeats_and_long_lines_stay_whole(monkeypatch):
    from export import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    out = io.StringIO()
    console = progress.BuildConsole(file=out, width=80)
    assert not console.is_terminal
    with console.status("llm: exporting ONNX"):
        time.sleep(0.3)
    console.print("x" * 200 + " end", highlight=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "llm: exporting ONNX ..."
    beats = [line for line in lines if line.startswith("  ... llm: exporting ONNX (")]
    assert len(beats) >= 3
    assert lines[-1] == "x" * 200 + " end"  # one line, not wrapped at 80
