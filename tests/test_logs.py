"""Where lines go: the run's own lines on the console and in the log file, library INFO chatter and
file-only lines in the log file only, warnings on both; the remote (gs://-style) log file is
written whole from a local copy."""

import logging
import sys

from absl import logging as absl_logging

from mgd_jax.runtime import logs


def test_console_and_log_file(tmp_path, capsys):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        # What absl does at its first log call without a handler: Python's default console.
        root.handlers = [logging.StreamHandler(sys.stderr)]
        logs.configure_console()
        with logs.log_file(str(tmp_path)):
            logs.say("step 1/2: loss=0.5")
            logs.say("batch_size: 8", console=False)  # e.g. the full config
            absl_logging.info("orbax chatter")
            logging.getLogger("some.library").info("more chatter")
            logging.getLogger("some.library").warning("a real problem")
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                logging.getLogger("some.library").exception("save failed\nsecond line")
            logs.say("from another process", primary=False)
        logs.say("after the run")
    finally:
        root.handlers, root.level = saved
    out, err = capsys.readouterr()
    assert out == "step 1/2: loss=0.5\nafter the run\n"
    assert "chatter" not in err and "a real problem" in err
    # A library's error with a traceback: one console line; the traceback in the log file.
    assert "ERROR some.library: save failed (more in the run's log.txt)\n" in err
    assert "Traceback" not in err and "second line" not in err
    text = (tmp_path / logs.LOG_FILE).read_text()
    for line in ("step 1/2: loss=0.5", "batch_size: 8", "orbax chatter", "more chatter",
                 "a real problem", "second line", "Traceback", "No space left on device"):
        assert line in text
    assert "after the run" not in text and "another process" not in text
    assert text.splitlines()[0].split(" ")[2] == "I"  # time, level, logger: message


def test_remote_log_file_is_written_whole(tmp_path):
    target = tmp_path / "run" / logs.LOG_FILE
    target.parent.mkdir()
    target.write_text("line of the first attempt\n")
    handler = logs.LogFile(str(target), remote=True, sync_seconds=3600)
    logger = logging.getLogger("mgd_jax.test_remote")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("resumed")
        assert target.read_text() == "line of the first attempt\n"  # nothing appended remotely
        handler.sync()
        assert target.read_text().endswith("resumed\n")
        logger.info("finished")
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = target.read_text().splitlines()
    assert lines[0] == "line of the first attempt" and lines[-1].endswith("finished")
    assert len(lines) == 3
