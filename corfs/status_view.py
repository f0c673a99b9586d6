"""Showing status to a person: a table per mount, JSON, or live progress bars (--watch)."""

from __future__ import annotations

import json
import math
import sys
import time

from . import control_client
from .errors import CorfsError, error_line
from .printable import printable
from .sizes import format_size

# States --watch waits no longer for: nothing more will be fetched for the image.
FINAL_STATES = ("complete", "error", "detached")


def eta_text(seconds: float | None) -> str:
    """H:MM:SS, rounded up: 0:00:00 only once nothing is left (0.9 s to go showed 0:00:00)."""
    if seconds is None:
        return "-"
    seconds = math.ceil(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def rate_text(rate_bps: float) -> str:
    return f"{format_size(rate_bps)}/s" if rate_bps else "-"


def fill_percent(ratio: float) -> str:
    """A fill ratio in percent, one decimal, never 100.0% short of complete (rounded, an image
    one chunk short showed 100.0%, and `corfs detach` refused it as "100.0% local")."""
    percent = ratio * 100 if ratio >= 1.0 else min(ratio * 100, 99.9)
    return f"{percent:.1f}%"


def format_table(status: dict) -> str:
    mounted = status.get("mounted")
    # Every text shown is printable(): paths, and errors quoting what a base answered.
    where = printable(
        str(status.get("mountpoint")) if mounted else f"{status['cache']} (not mounted)"
    )
    lines = [f"{where}  base: {printable(status.get('base') or '-')}"]
    columns = ("IMAGE", "SIZE", "LOCAL", "FILL", "STATE", "RATE", "ETA")
    lines.append("{:<24} {:>10} {:>10} {:>7} {:<10} {:>12} {:>9}".format(*columns))
    for image in status["images"]:
        lines.append(
            f"{printable(image['name']):<24} {format_size(image['size']):>10} "
            f"{format_size(image['local_bytes']):>10} {fill_percent(image['fill_ratio']):>7} "
            f"{image['state']:<10} {rate_text(image['rate_bps']):>12} "
            f"{eta_text(image['eta_s']):>9}"
        )
        if image.get("failing_chunks"):
            listed = image["failing_chunk_indexes"]
            more = ", ..." if image["failing_chunks"] > len(listed) else ""
            indexes = ", ".join(str(index) for index in listed)
            lines.append(f"  failing chunks: {image['failing_chunks']} ({indexes}{more})")
        if image.get("detached_to"):
            lines.append(f"  handed over to QEMU: {printable(image['detached_to'])}")
        if image.get("handoff_error"):
            lines.append(f"  last handoff failed: {printable(image['handoff_error'])}")
        if image.get("error"):
            lines.append(f"  error: {printable(image['error'])}")
    return "\n".join(lines)


def print_status(statuses: list[dict], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else {"mounts": statuses}))
        return
    if not statuses:
        return
    print("\n\n".join(format_table(s) for s in statuses))


def watch_status(paths: list[str], interval: float = 1.0) -> int:
    """Progress bars per image until every image is complete, failed or handed over (0), or
    Ctrl-C (130). Caches no mount serves are shown once: nothing would change (1 if one of
    their images is not complete). A path that cannot be read is said once on stderr and
    asked no more, the others are watched on; the exit code is then its error's."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

    # Rate and ETA are corfs's (as `corfs status` shows them), not rich's estimates from the
    # bar's progress: those went on showing a speed and a time left while a stream was paused
    # and counted the paused seconds after a resume.
    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]:>12}"),
        TextColumn("{task.fields[eta]:>9}"),
        TextColumn("{task.fields[state]}"),
    )
    tasks: dict[tuple[str, str], TaskID] = {}
    watched, failed = list(paths), list[CorfsError]()  # the paths still asked; errors said
    try:
        # Lines for stderr go above the bars when stderr is the terminal too; rich would send
        # them to the terminal (stdout) even when stderr goes elsewhere (`2>log`).
        with Progress(*columns, redirect_stderr=sys.stderr.isatty()) as progress:
            while True:
                done, live, unmounted = True, False, []
                answers = control_client.ask_every(watched, control_client.status_of_path)
                for error in answers:
                    if isinstance(error, CorfsError):  # said once; asked no more (a hung
                        print(error_line(error), file=sys.stderr)  # daemon: 10 s a tick)
                        failed.append(error)
                asked, watched = watched, [
                    path for path, answer in zip(watched, answers, strict=True)
                    if not isinstance(answer, CorfsError)
                ]
                if not watched:
                    return failed[-1].exit_code
                for path, status in zip(asked, answers, strict=True):
                    if isinstance(status, CorfsError):
                        continue
                    if status.get("mounted", True):
                        live = True
                    else:
                        unmounted.append(path)
                    for image in status["images"]:
                        key = (path, image["name"])  # "/a:b" + "c" is not "/a" + "b:c"
                        if key not in tasks:
                            # escape: rich reads "[...]" as markup ("disk[server].raw"
                            # was shown as "disk.raw", another image's name).
                            tasks[key] = progress.add_task(
                                escape(printable(image["name"])), total=image["size"],
                                state="", rate="", eta="",
                            )
                        progress.update(
                            tasks[key], completed=image["local_bytes"], state=image["state"],
                            rate=rate_text(image["rate_bps"]), eta=eta_text(image["eta_s"]),
                        )
                        done &= image["state"] in FINAL_STATES
                if done:
                    return failed[-1].exit_code if failed else 0
                if not live:  # nothing will change: no daemon streams into these caches
                    progress.stop()
                    print(f"corfs: {printable(', '.join(unmounted))}: not mounted, nothing streams "
                          "into it (mount it to complete)", file=sys.stderr)
                    return 1
                time.sleep(interval)
    except KeyboardInterrupt:
        return 130
