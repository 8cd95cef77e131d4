from mlseg.progress import ProgressLog, duration


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_long_run_says_how_far_it_is_once_a_minute_with_the_time_left():
    """In a job's log segment and quantify said nothing for hours: a working run looked like
    a hung one. A line a minute says how many images are done, failed, and how long is left."""
    clock, lines = Clock(), []
    said = ProgressLog("segment", 2000, "images", lines.append, clock=clock)
    for i in range(16):  # 15 s an image
        clock.now += 15
        said.step("failed" if i in (1, 6, 9) else "done")
    assert lines == [
        "segment: 4/2000 images (0%), 1 failed, 1 min elapsed, about 8 h 19 min left",
        "segment: 8/2000 images (0%), 2 failed, 2 min elapsed, about 8 h 18 min left",
        "segment: 12/2000 images (0%), 3 failed, 3 min elapsed, about 8 h 17 min left",
        "segment: 16/2000 images (0%), 3 failed, 4 min elapsed, about 8 h 16 min left",
    ]


def test_a_short_run_stays_silent_and_a_long_one_ends_with_a_last_line():
    clock, lines = Clock(), []
    said = ProgressLog("quantify", 5, "images", lines.append, clock=clock)
    for _ in range(5):
        clock.now += 5
        said.step()
    said.close()
    assert lines == []
    said = ProgressLog("quantify", 5, "images", lines.append, clock=clock)
    for _ in range(5):
        clock.now += 40
        said.step()
    said.close()
    assert lines[-1] == "quantify: 5/5 images (100%), 3 min elapsed"
    assert len(lines) == 3  # after 80 and 160 s, then the last


def test_a_run_over_a_minute_ends_with_its_length_even_with_no_line_before():
    """Three images over 90 s, or one over ten minutes, reached the end before a minute had
    passed since the last line and wrote nothing, where the README promises a long run a last
    line with its length."""
    clock, lines = Clock(), []
    said = ProgressLog("segment", 3, "images", lines.append, clock=clock)
    for seconds in (30, 20, 40):
        clock.now += seconds
        said.step()
    said.close()
    assert lines == ["segment: 3/3 images (100%), 2 min elapsed"]
    said = ProgressLog("evaluate test", 1, "images", lines.append, clock=clock)
    clock.now += 600
    said.step()
    said.close()
    assert lines[-1] == "evaluate test: 1/1 images (100%), 10 min elapsed"


def test_images_already_done_do_not_shorten_the_time_left():
    """A resumed run skips its finished images in no time; counted in the rate, they
    promised the hours left in minutes."""
    clock, lines = Clock(), []
    said = ProgressLog("segment", 100, "images", lines.append, clock=clock)
    for _ in range(90):
        said.step("skipped")
    for _ in range(2):
        clock.now += 60
        said.step()
    assert lines[-1] == (
        "segment: 92/100 images (92%, 90 already done), 2 min elapsed, about 8 min left"
    )


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 59, 59.7, 3599, 3600, 13200)] == [
        "0 s",
        "59 s",
        "1 min",
        "1 h",
        "1 h",
        "3 h 40 min",
    ]
