"""report.html: one self-contained page about a dataset folder, for people to look at.

    path = jflame.report.write_report("annotations/")      # -> annotations/report.html

The page shows the status counts (with the most common messages of each failure status), the
most common suspect reasons, histograms of the quality measures of the fitted rows (landmark
error in % of face size, shape and expression prior sigma, convergence), the throughput over
time (rows committed per minute and in total, from the shards' `written_at`), the last run's
summary (run_summary.json, with the rows whose source was gone) and three galleries: the worst
fits (highest landmark error), the other suspect fits and a random sample of the fitted rows,
chosen among all rows, whether or not the run kept a picture of them.

The galleries' pictures come from `draw` (a function of a row; `jflame.row_pictures` draws the
fit over the source photo with the dataset's model, which this module does not import), written
to <folder>/report_pictures/ at most 2048 pixels long; without `draw`, a row's stored picture
(jflame-annotate --overlays) when it has one. A row whose picture cannot be drawn (its source
is gone, changed or unreadable) gets a tile that says why.

`folder` may also be the output of a split run (jflame-annotate --num_shards): the page is then
about all its parts together (see `jflame.dataset.dataset_folders`).

Self-contained: no external CSS, scripts, fonts or images; charts are inline SVG, thumbnails are
base64 data URIs (a thumbnail links to its full-size picture by a relative path, which works
while the page sits in its folder). Every string from the data is escaped. The table is read
column by column with pyarrow; Python objects are built only for the gallery's rows and the
failed rows' messages, so a dataset of millions of rows costs a few column reads.
"""

import base64
import datetime
import hashlib
import html
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jflame import dataset, quality
from jflame.atomic import atomic_path, write_text
from jflame.manifest import SUMMARY_NAME
from jflame.pictures import MAX_PICTURE_SIDE, fit_within

REPORT_NAME = "report.html"
PICTURE_FOLDER = "report_pictures"  # the galleries' full-size pictures, beside the page
COLUMNS = ("id", "row_uid", "source_path", "status", "message", "landmark_error_relative",
           "shape_prior_sigma", "expression_prior_sigma", "convergence", "suspect",
           "suspect_reason", "fit_ms", "files", "written_at")
# Written by a later format (source_relpath: the path under the input root); read when there.
OPTIONAL_COLUMNS = ("source_relpath",)
GALLERY_SIZE = 12
MISSING_IDS_SHOWN = 20
THUMBNAIL_SIZE = 256
TOP_MESSAGES = 5
TOP_REASONS = 8
PICTURE_PATTERN = r"(?i)\.(png|jpe?g)$"
HISTOGRAM_BINS = 40
MAX_TIME_BINS = 60
MAX_LINE_POINTS = 1000
PAUSE_FACTOR = 3.0  # a gap between commits this many times the usual one is a pause


class NoPicture(Exception):
  """A row's picture cannot be drawn; the message says why (its tile shows it)."""


# A row (a dict of all its columns) -> its picture, (H, W, 3) uint8 RGB, or (picture, box): the
# box (x0, y0, x1, y1, picture pixels) is what the thumbnail shows (the face, not the whole photo).
Draw = Callable[[Mapping], object]


def write_report(folder, gallery_size: int = GALLERY_SIZE, seed: int = 0,
                 draw: Optional[Draw] = None, draw_note: str = "") -> Path:
  """Writes <folder>/report.html (atomically) about the dataset in `folder`; returns its path.

  A folder without an index yet (a run that committed nothing) gets a page that says so.

  Args:
    folder: a jflame dataset folder (see `jflame.dataset`), or the output of a split run.
    gallery_size: pictures in each gallery (worst fits, other suspect fits, random sample).
    seed: the random sample's seed (the same dataset gives the same page).
    draw: makes a row's picture (see `jflame.row_pictures.row_drawer`); may raise NoPicture
      (or any error: a picture never costs the page). None: the rows' stored pictures.
    draw_note: a line about how the pictures were drawn (e.g. why without meshes).
  """
  folder = Path(folder)
  parts = dataset.dataset_folders(folder)
  indexes = [dataset.read_index(part) for part in parts]
  table = _read_rows(folder) if parts else dataset.SCHEMA.empty_table().select(
      list(COLUMNS))
  settings = indexes[0].get("settings", {}) if indexes else {}
  summaries = [(part, _read_summary(part)) for part in parts]
  pictures = _Pictures(folder, parts, indexes, draw, draw_note)
  page = _page(folder, table, settings, summaries, pictures, gallery_size, seed)
  pictures.remove_stale()
  path = folder / REPORT_NAME
  write_text(path, page)
  return path


def _read_rows(folder: Path) -> pa.Table:
  """The current rows' report columns, chunks merged (one chunk per shard otherwise)."""
  rows = dataset.open(folder)
  names = list(COLUMNS) + [name for name in OPTIONAL_COLUMNS if name in rows.schema.names]
  return rows.to_table(columns=names).combine_chunks()


def all_parts_finished(folder) -> bool:
  """Whether `folder` holds every part of a split run (part-<i>-of-<N>, N of them) and the
  latest run of each finished without an interrupt (its run_summary.json says so)."""
  parts = dataset.dataset_folders(folder)
  counts = {re.fullmatch(r"part-\d+-of-(\d+)", part.name) for part in parts}
  if not parts or None in counts or len({int(m.group(1)) for m in counts}) != 1:
    return False
  expected = int(next(iter(counts)).group(1))
  summaries = [_read_summary(part) for part in parts]
  return len(parts) == expected and all(
      summary is not None and not summary.get("interrupted") for summary in summaries)


def _read_summary(folder: Path) -> Optional[dict]:
  path = folder / SUMMARY_NAME
  try:
    summary = json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # no run finished yet, or a file from elsewhere: the page does without
  return summary if isinstance(summary, dict) else None


# --- numbers from the table -----------------------------------------------------------------

def _floats(column) -> np.ndarray:
  """A float column as float64 with nulls as NaN."""
  return pc.fill_null(pc.cast(column, pa.float64()), math.nan).to_numpy()


def _ok_mask(table: pa.Table) -> np.ndarray:
  return pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)


def status_counts(table: pa.Table) -> List[Tuple[str, int]]:
  """(status, rows), ok first, then the most common."""
  counts = pc.value_counts(pc.fill_null(table["status"], "(none)"))
  pairs = list(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
  return sorted(pairs, key=lambda pair: (pair[0] != "ok", -pair[1], pair[0]))


PATH_PLACEHOLDER = "<path>"
_FILE_EXTENSIONS = "png|jpe?g|webp|bmp|tiff?|gif|heic|heif|avif|jp2|pgm|ppm|pbm|exr|npz|txt"
# (pattern, replacement) run over whole columns by pyarrow (RE2: linear time, no lookaround, so
# the character before a path is matched and put back). First paths: an absolute one (POSIX, ~
# or a drive letter; its trailing punctuation stays in the message), then any word ending in a
# file extension. Then the numbers that differ from image to image in jflame's messages: a face
# box, a file's bytes, a pixel count.
_GENERALISATIONS = (
    (r"""(^|[\s'"(=])(~|[A-Za-z]:)?[/\\][^\s'"]*[^\s'":,.;)\]]""", rf"\1{PATH_PLACEHOLDER}"),
    (rf"""(?i)(^|[\s'"(\[=])[^\s'"()\[\]]+\.(?:{_FILE_EXTENSIONS})\b""",
     rf"\1{PATH_PLACEHOLDER}"),
    (r"\[[-\d.,\s]+\]", "[…]"),
    (r"\b[1-9]\d* bytes\b", "… bytes"),
    (r"\b\d{5,}\b", "…"))


def general_messages(messages, paths: Optional[Sequence[Sequence[Optional[str]]]] = None
                     ) -> pa.Array:
  """The messages with each row's own paths (`paths[i]`: its source path as stored, as
  given...), any other path or file name and the image-specific numbers taken out, so that the
  messages of the same failure read the same and group. Nulls read as ""."""
  texts = [message or "" for message in (
      messages.to_pylist() if isinstance(messages, (pa.Array, pa.ChunkedArray)) else messages)]
  if paths is not None:  # str.replace per row (a path may hold spaces; a regex could not tell)
    for number, row_paths in enumerate(paths):
      for path in sorted((p for p in row_paths if p), key=len, reverse=True):
        texts[number] = texts[number].replace(path, PATH_PLACEHOLDER)
  column = pa.array(texts, pa.string())
  for pattern, replacement in _GENERALISATIONS:
    column = pc.replace_substring_regex(column, pattern, replacement)
  return column


def general_message(message: Optional[str], paths: Sequence[Optional[str]] = ()) -> str:
  """`general_messages` of one message."""
  return general_messages([message], [paths])[0].as_py()


def _general_messages_of(rows: pa.Table) -> pa.Array:
  """`general_messages` of rows (their source_path and, when stored, source_relpath)."""
  path_columns = [rows[name].to_pylist() for name in ("source_path", "source_relpath")
                  if name in rows.column_names]
  return general_messages(rows["message"], list(zip(*path_columns)) if path_columns else None)


def top_messages(table: pa.Table, status: str, count: int = TOP_MESSAGES
                 ) -> Tuple[List[Tuple[str, int]], int]:
  """The `count` most common messages of the rows with `status` (paths taken out, see
  `general_message`), and how many rows the other messages have."""
  groups, others = _message_groups(table, status, count)
  return [(message, number) for message, number, _ in groups], others


def _message_groups(table: pa.Table, status: str, count: int = TOP_MESSAGES
                    ) -> Tuple[List[Tuple[str, int, str]], int]:
  """`top_messages` with the id of one row of each message (an example to look at)."""
  rows = table.filter(pc.fill_null(pc.equal(table["status"], status), False))
  general = _general_messages_of(rows)
  messages = pc.value_counts(general)
  order = np.argsort(-messages.field("counts").to_numpy(), kind="stable")[:count]
  top = messages.take(pa.array(order, pa.int64())) if len(order) else messages.slice(0, 0)
  groups = [(message, number, rows["id"][pc.index(general, message).as_py()].as_py())
            for message, number in zip(top.field("values").to_pylist(),
                                       top.field("counts").to_pylist())]
  return groups, rows.num_rows - sum(number for _, number, _ in groups)


def suspect_reasons(table: pa.Table, count: int = TOP_REASONS) -> List[Tuple[str, int]]:
  """The most common reasons of suspect fits, each reason of a row counted on its own and with
  its measured number written as '…' (the limit stays), so that equal reasons group."""
  mask = pc.and_(pc.fill_null(table["suspect"], False),
                 pc.fill_null(pc.equal(table["status"], "ok"), False))
  reasons = pc.list_flatten(pc.split_pattern(
      pc.fill_null(table["suspect_reason"].filter(mask), ""), "; "))
  reasons = reasons.filter(pc.greater(pc.utf8_length(reasons), 0))
  general = pc.replace_substring_regex(reasons, r"\d+(\.\d+)?", "…", max_replacements=1)
  counts = pc.value_counts(general)
  pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
  return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:count]


def picture_rows(table: pa.Table) -> np.ndarray:
  """Indices of the rows with at least one picture (png/jpeg) in `files`, ascending."""
  files = table["files"].combine_chunks() if isinstance(table["files"], pa.ChunkedArray) else \
      table["files"]
  parents = pc.list_parent_indices(files).to_numpy()
  is_picture = pc.fill_null(pc.match_substring_regex(pc.list_flatten(files), PICTURE_PATTERN),
                            False).to_numpy(zero_copy_only=False)
  return np.unique(parents[is_picture]).astype(np.int64)


def gallery_indices(table: pa.Table, count: int, seed: int
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(worst, suspect, sample) among all fitted rows, whether they have a picture or not: the
  highest landmark errors (highest first), the other suspect fits (highest error first), and
  a random sample of the rest."""
  ok = _ok_mask(table)
  errors = _floats(table["landmark_error_relative"])
  errors = np.where(np.isfinite(errors), errors, -np.inf)  # a fit without an error: last
  fitted = np.flatnonzero(ok)
  by_error = fitted[np.argsort(-errors[fitted], kind="stable")]
  worst = by_error[:count]
  suspect_mask = pc.fill_null(table["suspect"], False).to_numpy(zero_copy_only=False)
  suspect = by_error[count:][suspect_mask[by_error[count:]]][:count]
  rest = np.setdiff1d(fitted, np.concatenate([worst, suspect]))
  rng = np.random.default_rng(seed)
  sample = rng.choice(rest, size=min(count, rest.size), replace=False) if rest.size else rest
  return worst, suspect, np.asarray(sample, np.int64)


def commit_times(table: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
  """(times in ms since the epoch, rows committed then), sorted by time: one point per shard
  commit, since a shard's rows share its `written_at`."""
  millis = pc.drop_null(pc.cast(table["written_at"], pa.int64()))
  counts = pc.value_counts(millis)
  times = counts.field("values").to_numpy().astype(np.int64)
  rows = counts.field("counts").to_numpy().astype(np.int64)
  order = np.argsort(times)
  return times[order], rows[order]


# --- charts (inline SVG) ---------------------------------------------------------------------

_WIDTH, _HEIGHT = 520, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 16, 14, 46


def _nice_step(span: float, count: int) -> float:
  """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `count` ticks."""
  raw = max(span, 1e-12) / max(count, 1)
  magnitude = 10.0 ** math.floor(math.log10(raw))
  for multiple in (1.0, 2.0, 2.5, 5.0, 10.0):
    if multiple * magnitude >= raw:
      return multiple * magnitude
  return 10.0 * magnitude


def _ticks(low: float, high: float, count: int = 5) -> np.ndarray:
  step = _nice_step(high - low, count)
  return np.arange(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1) * step


def _number(value: float) -> str:
  """A short label for a tick or statistic."""
  if value == 0:
    return "0"
  if abs(value) >= 10000:
    return f"{value:,.0f}"
  if abs(value) >= 100:
    return f"{value:.0f}"
  return f"{value:.3g}"


class _Plot:
  """Maps data to the pixels of one chart and draws its axes."""

  def __init__(self, x_range, y_range):
    self.x0, self.x1 = x_range
    self.y0, self.y1 = y_range
    self.parts: List[str] = []

  def x(self, value: float) -> float:
    span = (self.x1 - self.x0) or 1.0
    return _LEFT + (value - self.x0) / span * (_WIDTH - _LEFT - _RIGHT)

  def y(self, value: float) -> float:
    span = (self.y1 - self.y0) or 1.0
    return _HEIGHT - _BOTTOM - (value - self.y0) / span * (_HEIGHT - _TOP - _BOTTOM)

  def axes(self, x_label: str, y_label: str, x_ticks, y_ticks) -> None:
    bottom, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
    for tick in y_ticks:
      y = self.y(tick)
      self.parts.append(f'<line class="grid" x1="{_LEFT}" x2="{right}" y1="{y:.1f}" '
                        f'y2="{y:.1f}"/><text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" '
                        f'text-anchor="end">{_number(tick)}</text>')
    for tick in x_ticks:
      x = self.x(tick)
      self.parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" '
                        f'y2="{bottom + 4}"/><text class="tick" x="{x:.1f}" y="{bottom + 17}" '
                        f'text-anchor="middle">{_number(tick)}</text>')
    self.parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}"/>'
        f'<text class="label" x="{(_LEFT + right) / 2:.1f}" y="{_HEIGHT - 6}" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text class="label" transform="translate(14 {(_TOP + bottom) / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(y_label)}</text>')

  def svg(self, title: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img">'
            f'<title>{html.escape(title)}</title>'
            + "".join(self.parts) + "</svg>")


def _histogram_upper(values: np.ndarray, limit: Optional[float]) -> float:
  """The histogram's right end: the largest value, or past a long tail its 99th percentile
  (what lies beyond goes into the last bar), and always past the suspect limit."""
  top = float(np.max(values))
  cap = float(np.percentile(values, 99))
  upper = top if top <= 1.5 * cap else cap
  if limit is not None:
    upper = max(upper, 1.25 * limit)
  step = _nice_step(upper, 5)
  return max(step * math.ceil(upper / step - 1e-9), step)


def histogram_svg(values: np.ndarray, title: str, x_label: str,
                  limit: Optional[float] = None, unit: str = "") -> str:
  """An SVG histogram of finite non-negative values, the suspect limit as a dashed line."""
  values = values[np.isfinite(values)]
  if values.size == 0:
    return f'<div class="empty">{html.escape(title)}: no fitted rows.</div>'
  upper = _histogram_upper(values, limit)
  low = min(0.0, float(np.min(values)))
  counts, edges = np.histogram(np.clip(values, low, upper), HISTOGRAM_BINS, range=(low, upper))
  overflow = int(np.sum(values > upper))
  plot = _Plot((low, upper), (0.0, max(float(counts.max()), 1.0) * 1.08))
  y_ticks = [t for t in _ticks(0, plot.y1) if t == int(t)]
  plot.axes(x_label, "fitted rows", _ticks(low, upper), y_ticks)
  for number, (count, left, right) in enumerate(zip(counts, edges[:-1], edges[1:])):
    if count:
      css = "bar over" if overflow and number == len(counts) - 1 else "bar"
      x, y = plot.x(left), plot.y(count)
      plot.parts.append(f'<rect class="{css}" x="{x + 0.5:.1f}" y="{y:.1f}" '
                        f'width="{max(plot.x(right) - x - 1, 0.5):.1f}" '
                        f'height="{plot.y(0) - y:.1f}"><title>{_number(left)}–'
                        f'{_number(right)}: {count}</title></rect>')
  if limit is not None:
    x = plot.x(limit)
    plot.parts.append(f'<line class="limit" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" '
                      f'y2="{_HEIGHT - _BOTTOM}"/><text class="limit-label" x="{x + 4:.1f}" '
                      f'y="{_TOP + 10}">suspect &gt; {_number(limit)}{_e(unit)}</text>')
  notes = (f"n = {values.size:,} · median {_number(float(np.median(values)))} · "
           f"90th percentile {_number(float(np.percentile(values, 90)))} · "
           f"max {_number(float(values.max()))}")
  if overflow:
    notes += f" · {overflow:,} above {_number(upper)} in the last bar (darker)"
  return (f'<figure><figcaption>{html.escape(title)}</figcaption>{plot.svg(title)}'
          f'<p class="note">{notes}</p></figure>')


def commit_intervals(times_ms: np.ndarray) -> np.ndarray:
  """(start, end) minutes of the time each commit's rows were made in, from the first start.

  A shard's rows were made between the previous commit and its own, so they are spread over
  that interval; a gap much longer than usual (a pause between runs) and the first commit get
  the usual (median) interval instead.
  """
  minutes = (times_ms - times_ms[0]) / 60000.0
  gaps = np.diff(minutes)
  usual = float(np.median(gaps))
  spans = np.concatenate([[usual], np.where(gaps <= PAUSE_FACTOR * usual, gaps, usual)])
  starts = minutes - spans
  return np.stack([starts, minutes], axis=1) - starts[0]


def _time_bin_minutes(span: float) -> float:
  """A round width for the rate's bars: at most MAX_TIME_BINS bars over `span` minutes."""
  wanted = span / MAX_TIME_BINS
  for minutes in (0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 240, 360, 720, 1440):
    if minutes >= wanted:
      return float(minutes)
  return 1440.0 * math.ceil(wanted / 1440.0)


def _made_by(intervals: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(minutes, rows made by then): the corners of the cumulative curve, each commit's rows
  spread evenly over its interval (the intervals follow one another, so it is one line)."""
  total = np.cumsum(rows).astype(np.float64)
  before = np.concatenate([[0.0], total[:-1]])
  return intervals.reshape(-1), np.stack([before, total], axis=1).reshape(-1)


def throughput_svgs(times_ms: np.ndarray, rows: np.ndarray) -> str:
  """Rows committed per minute (bars) and in total (a line) over the run's time."""
  if times_ms.size < 2:
    if times_ms.size == 1:
      return (f'<p class="note">All {int(rows.sum()):,} rows were committed at once '
              f'({_clock(times_ms[0])}): one shard commit, no curve to draw.</p>')
    return '<p class="note">No rows committed yet.</p>'
  intervals = commit_intervals(times_ms)
  span = float(intervals[-1, 1])
  scale, unit = (60.0, "hours") if span > 180 else (1.0, "minutes")
  origin = times_ms[0] - 60000.0 * (intervals[0, 1] - intervals[0, 0])
  x_label = f"{unit} since {_clock(origin)}"
  width = _time_bin_minutes(span)
  bins = max(int(math.ceil(span / width - 1e-9)), 1)
  minutes, made = _made_by(intervals, rows)
  rate = np.diff(np.interp(np.arange(bins + 1) * width, minutes, made)) / width
  end = bins * width / scale
  bars = _Plot((0.0, end), (0.0, max(float(rate.max()), 1e-9) * 1.08))
  bars.axes(x_label, "rows per minute", _ticks(0, end), _ticks(0, bars.y1))
  for number, value in enumerate(rate):
    if value > 1e-9:
      x, right, y = bars.x(number * width / scale), bars.x((number + 1) * width / scale), \
          bars.y(value)
      bars.parts.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{y:.1f}" '
                        f'width="{max(right - x - 1, 0.5):.1f}" height="{bars.y(0) - y:.1f}">'
                        f'<title>{value:.1f} rows/min</title></rect>')
  if minutes.size > MAX_LINE_POINTS:  # thousands of shards: the page needs no more points
    moments = np.linspace(0.0, span, MAX_LINE_POINTS)
    minutes, made = moments, np.interp(moments, minutes, made)
  line = _Plot((0.0, span / scale), (0.0, float(made[-1]) * 1.05))
  line.axes(x_label, "rows committed", _ticks(0, line.x1), _ticks(0, line.y1))
  line.parts.append('<polyline class="line" points="' + " ".join(
      f"{line.x(t / scale):.1f},{line.y(n):.1f}" for t, n in zip(minutes, made)) + '"/>')
  return ('<div class="charts">'
          f'<figure><figcaption>Rows committed per minute ({_number(width)}-minute bars)'
          f'</figcaption>{bars.svg("rows committed per minute")}</figure>'
          f'<figure><figcaption>Rows committed in total</figcaption>'
          f'{line.svg("rows committed in total")}</figure></div>'
          f'<p class="note">From the shards\' commit times (<code>written_at</code>), '
          f'{times_ms.size:,} commits: a shard\'s rows are spread over the time since the '
          'commit before it (a pause between runs shows as a gap). Superseded rows '
          '(refitted inputs) are not counted.</p>')


def _moment(iso: Optional[str]) -> str:
  """An ISO time from a summary as 'YYYY-MM-DD HH:MM:SS UTC' ('–' when missing)."""
  try:
    moment = datetime.datetime.fromisoformat(str(iso))
  except ValueError:
    return "–" if not iso else str(iso)
  if moment.tzinfo is not None:
    moment = moment.astimezone(datetime.timezone.utc)
  return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock(millis) -> str:
  moment = datetime.datetime.fromtimestamp(int(millis) / 1000.0, datetime.timezone.utc)
  return moment.strftime("%Y-%m-%d %H:%M UTC")


# --- the page --------------------------------------------------------------------------------

_STYLE = """
:root { --ink: #1f2328; --muted: #656d76; --line: #d0d7de; --soft: #f6f8fa; --ok: #1a7f37;
        --bad: #cf222e; --warn: #9a6700; --bar: #4c78a8; --bar-dark: #23446b; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.45;
       font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 36px 0 12px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
.sub, .note { color: var(--muted); }
.note { font-size: 12.5px; margin: 4px 0 0; }
.charts + .note { margin-top: 10px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px;
         margin-top: 18px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
        background: var(--soft); }
.card .value { font-size: 22px; font-weight: 600; }
.card .what { color: var(--muted); font-size: 12.5px; }
.good { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.msg { color: var(--muted); padding-left: 28px; word-break: break-word; }
td.msg .example { color: #8c959f; font-size: 12px; }
.share { display: inline-block; height: 8px; background: var(--bar); border-radius: 2px;
         vertical-align: middle; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr));
          gap: 18px 28px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: #eaeef2; } svg .axis { stroke: #8c959f; }
svg .tick { font-size: 11px; fill: var(--muted); } svg .label { font-size: 12px; fill: var(--ink); }
svg .bar { fill: var(--bar); } svg .bar.over { fill: var(--bar-dark); }
svg .limit { stroke: var(--bad); stroke-width: 1.5; stroke-dasharray: 5 4; }
svg .limit-label { font-size: 11px; fill: var(--bad); }
svg .line { fill: none; stroke: var(--bar); stroke-width: 2; }
.empty { color: var(--muted); border: 1px dashed var(--line); border-radius: 8px; padding: 24px;
         text-align: center; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 14px; }
.tile { border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
        background: var(--soft); }
.tile img { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; background: #fff; }
.tile .missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
                 color: var(--muted); font-size: 12px; background: #fff; padding: 10px;
                 text-align: center; word-break: break-word; overflow: hidden; }
.tile .caption { padding: 6px 8px 8px; font-size: 12px; }
.tile .id { font-weight: 600; word-break: break-all; }
.tile .reason { color: var(--bad); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 0;
           font-size: 13px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; word-break: break-word; }
"""


def _e(value) -> str:
  return html.escape("" if value is None else str(value))


def _duration(milliseconds: float) -> str:
  return f"{milliseconds:.0f} ms" if milliseconds < 1000 else f"{milliseconds / 1000:.1f} s"


def _percent(part: int, whole: int) -> str:
  return f"{100.0 * part / whole:.1f}%" if whole else "–"


def _header(folder: Path, settings: Mapping, parts: int) -> str:
  facts = [("folder", str(folder.resolve())),
           ("parts", f"{parts} (a split run, all parts together)" if parts > 1 else None),
           ("report written", datetime.datetime.now(datetime.timezone.utc).strftime(
               "%Y-%m-%d %H:%M UTC"))]
  for key in ("model", "model_variant", "embedding", "mode", "crop_size"):
    if settings.get(key) is not None:
      facts.append((key.replace("_", " "), settings[key]))
  return ("<h1>jflame dataset report</h1>" + _facts(facts))


def _facts(facts: Sequence[Tuple[str, object]]) -> str:
  """A two-column list of (name, value), the values escaped; None values left out."""
  return '<dl class="facts">' + "".join(
      f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>" for key, value in facts if value is not None
  ) + "</dl>"


def _cards(table: pa.Table, counts: Sequence[Tuple[str, int]],
           missing: Optional[Tuple[int, List[str]]]) -> str:
  total = table.num_rows
  ok = dict(counts).get("ok", 0)
  ok_mask = _ok_mask(table)
  suspect = int(np.sum(ok_mask & pc.fill_null(table["suspect"], False).to_numpy(
      zero_copy_only=False)))
  errors = 100.0 * _floats(table["landmark_error_relative"])[ok_mask]
  errors = errors[np.isfinite(errors)]
  fit_ms = _floats(table["fit_ms"])[ok_mask]
  fit_ms = fit_ms[np.isfinite(fit_ms)]
  cards = [(f"{total:,}", "rows (one per input)", ""),
           (f"{ok:,}", f"fitted (ok) · {_percent(ok, total)}", "good" if ok else ""),
           (f"{suspect:,}", f"suspect fits · {_percent(suspect, ok)} of fitted",
            "warn" if suspect else ""),
           (f"{total - ok:,}", f"not fitted · {_percent(total - ok, total)}",
            "bad" if total - ok else ""),
           (f"{np.median(errors):.2f}%" if errors.size else "–",
            "median landmark error (of face size)", ""),
           (_duration(float(np.median(fit_ms))) if fit_ms.size else "–",
            "median fit time per image", "")]
  if missing is not None:
    cards.append((f"{missing[0]:,}", "rows whose source is gone (latest run)",
                  "bad" if missing[0] else ""))
  return '<div class="cards">' + "".join(
      f'<div class="card"><div class="value {css}">{value}</div><div class="what">{what}</div>'
      f"</div>" for value, what, css in cards) + "</div>"


def _status_section(table: pa.Table, counts: Sequence[Tuple[str, int]]) -> str:
  total = table.num_rows
  if not total:
    return '<h2>Status</h2><div class="empty">The dataset holds no rows yet.</div>'
  rows = []
  for status, count in counts:
    width = 120.0 * count / total
    rows.append(f'<tr><td><b class="{"good" if status == "ok" else "bad"}">{_e(status)}</b>'
                f'</td><td class="n">{count:,}</td><td class="n">{_percent(count, total)}</td>'
                f'<td><span class="share" style="width:{width:.1f}px"></span></td></tr>')
    if status == "ok":
      continue
    groups, others = _message_groups(table, status)
    for message, number, example in groups:
      rows.append(f'<tr><td class="msg">{_e(message) or "(no message)"} <span class="example">'
                  f'(e.g. {_e(example)})</span></td><td class="n">{number:,}</td>'
                  f'<td class="n">{_percent(number, total)}</td><td></td></tr>')
    if others:
      rows.append(f'<tr><td class="msg">… other messages</td><td class="n">{others:,}</td>'
                  f'<td class="n">{_percent(others, total)}</td><td></td></tr>')
  return ('<h2>Status</h2><table><tr><th>status / most common messages</th>'
          '<th class="n">rows</th><th class="n">share</th><th></th></tr>'
          + "".join(rows) + "</table>")


def _reasons_table(table: pa.Table) -> str:
  reasons = suspect_reasons(table)
  if not reasons:
    return '<p class="note">No suspect fits.</p>'
  fitted = int(np.sum(_ok_mask(table)))
  rows = "".join(f'<tr><td>{_e(reason)}</td><td class="n">{count:,}</td>'
                 f'<td class="n">{_percent(count, fitted)}</td></tr>' for reason, count in reasons)
  return ('<h3>Most common suspect reasons</h3><table><tr><th>reason (… is the measured value)'
          '</th><th class="n">fits</th><th class="n">of fitted</th></tr>' + rows + "</table>"
          '<p class="note">A fit can have several reasons.</p>')


def _quality_section(table: pa.Table) -> str:
  ok = _ok_mask(table)

  def column(name):
    return _floats(table[name])[ok]

  charts = [
      histogram_svg(100.0 * column("landmark_error_relative"), "Landmark error",
                    "mean landmark error, % of face size",
                    100.0 * quality.MAX_RELATIVE_LANDMARK_ERROR, "%"),
      histogram_svg(column("shape_prior_sigma"), "Shape prior",
                    "RMS of shape coefficients, standard deviations", quality.MAX_PRIOR_SIGMA,
                    " σ"),
      histogram_svg(column("expression_prior_sigma"), "Expression prior",
                    "RMS of expression coefficients, standard deviations",
                    quality.MAX_PRIOR_SIGMA, " σ"),
      histogram_svg(100.0 * column("convergence"), "Convergence",
                    "loss decrease over the last tenth of iterations, %",
                    100.0 * quality.MAX_FINAL_DECREASE, "%")]
  return ('<h2>Quality of the fits</h2><div class="charts">' + "".join(charts) + "</div>"
          + _reasons_table(table))


def source_missing(summaries: Sequence[Tuple[Path, Optional[Mapping]]]
                   ) -> Optional[Tuple[int, List[str]]]:
  """(rows whose source was gone at the latest run, their first ids) summed over the parts'
  run_summary.json `source_missing`; None when no summary says (unknown)."""
  known = [summary["source_missing"] for _, summary in summaries
           if summary and isinstance(summary.get("source_missing"), Mapping)]
  if not known:
    return None
  count = sum(int(entry.get("count") or 0) for entry in known)
  ids = [str(key) for entry in known for key in (entry.get("ids") or [])]
  return count, ids


def _missing_section(missing: Optional[Tuple[int, List[str]]]) -> str:
  if not missing or not missing[0]:
    return ""
  count, ids = missing
  shown = ", ".join(f"<code>{_e(key)}</code>" for key in ids[:MISSING_IDS_SHOWN])
  more = count - min(len(ids), MISSING_IDS_SHOWN)
  rows = "1 row" if count == 1 else f"{count:,} rows"
  return (f'<h3 class="bad">Sources gone: {rows}</h3><p>At the latest run these rows\' '
          "source files no longer existed (their rows are kept as they were): "
          f'{shown}{f" and {more:,} more" if more > 0 else ""}.</p>'
          '<p class="note">The full list (up to 1,000 ids) is <code>source_missing</code> in '
          "run_summary.json.</p>")


def _run_facts(summary: Mapping) -> List[Tuple[str, object]]:
  timings = summary.get("timings") or {}
  this_run = summary.get("this_run") or {}
  done = sum(n for status, n in this_run.items() if status != "skipped")
  wall = timings.get("wall_s")
  return [("started", summary.get("started")), ("finished", summary.get("finished")),
          ("interrupted", summary.get("interrupted")),
          ("this run", ", ".join(f"{k}: {v:,}" for k, v in sorted(this_run.items())) or "–"),
          ("wall time", f"{wall:.1f} s" if isinstance(wall, (int, float)) else None),
          ("images per second",
           f"{done / wall:.2f} (not counting skipped inputs)" if done and wall else None),
          ("time in", ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()
                                if k != "wall_s" and isinstance(v, (int, float))) or None),
          ("device", summary.get("device")), ("model", summary.get("model")),
          ("jax", summary.get("jax"))]


def _parts_table(folder: Path, summaries: Sequence[Tuple[Path, Optional[Mapping]]]) -> str:
  """One line per part of a split run: when its last run finished and what it did."""
  rows = []
  for part, summary in summaries:
    summary = summary or {}
    this_run = summary.get("this_run") or {}
    wall = (summary.get("timings") or {}).get("wall_s")
    state = ("not finished yet" if not summary else "interrupted" if summary.get("interrupted")
             else "finished")
    rows.append(f"<tr><td><code>{_e(part.relative_to(folder))}</code></td><td>{_e(state)}</td>"
                f"<td>{_e(_moment(summary.get('finished')))}</td>"
                f"<td>{_e(', '.join(f'{k}: {v:,}' for k, v in sorted(this_run.items())))}</td>"
                f'<td class="n">{f"{wall:.1f} s" if isinstance(wall, (int, float)) else "–"}'
                "</td></tr>")
  return ("<h3>Parts of the split run (their run_summary.json)</h3><table><tr><th>part</th>"
          "<th>last run</th><th>finished</th><th>that run</th><th class=\"n\">wall time</th>"
          "</tr>" + "".join(rows) + "</table>")


def _run_section(folder: Path, summaries: Sequence[Tuple[Path, Optional[Mapping]]],
                 times_ms: np.ndarray, rows: np.ndarray) -> str:
  parts = ["<h2>Throughput</h2>", throughput_svgs(times_ms, rows)]
  if len(summaries) > 1:
    parts.append(_parts_table(folder, summaries))
  elif summaries and summaries[0][1] is not None:
    parts.append("<h3>Last run (run_summary.json)</h3>" + _facts(_run_facts(summaries[0][1])))
  return "".join(parts)


# --- the galleries ---------------------------------------------------------------------------

def _picture_of(files: Optional[Sequence[str]]) -> Optional[str]:
  """The row's stored picture to show: its overlay, else its first picture."""
  pictures = [name for name in files or () if name.lower().endswith((".png", ".jpg", ".jpeg"))]
  overlays = [name for name in pictures if "_overlay." in name]
  return (overlays or pictures or [None])[0]


def _jpeg(image: np.ndarray, quality: int = 85) -> Optional[bytes]:
  """JPEG bytes of an RGB uint8 image."""
  import cv2  # only a page with pictures needs OpenCV
  ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                          [cv2.IMWRITE_JPEG_QUALITY, quality])
  return data.tobytes() if ok else None


def _thumbnail(image: np.ndarray, size: int = THUMBNAIL_SIZE, box=None) -> Optional[str]:
  """A JPEG data URI of an RGB image (of its `box`, x0, y0, x1, y1, when given), at most `size`
  pixels on its longer side."""
  if box is not None:
    height, width = image.shape[:2]
    x0, y0 = (max(int(np.floor(v)), 0) for v in box[:2])
    x1, y1 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
    if x1 - x0 >= 8 and y1 - y0 >= 8:  # else the whole picture
      image = image[y0:y1, x0:x1]
  data = _jpeg(fit_within(image, size)[0])
  return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii") if data else None


def _read_rgb(path: Path) -> Optional[np.ndarray]:
  import cv2
  image = cv2.imread(str(path), cv2.IMREAD_COLOR)
  return None if image is None else image[..., ::-1]


def _inside(folder: Path, relative: str) -> Optional[Path]:
  """`folder / relative` when it stays inside the folder (file names come from the data)."""
  path = (folder / relative).resolve()
  try:
    path.relative_to(folder.resolve())
  except ValueError:
    return None
  return path


class _Pictures:
  """The galleries' pictures: drawn by `draw` into <folder>/report_pictures/ (and removed from
  there once no page shows them), or the rows' stored pictures."""

  def __init__(self, folder: Path, parts: Sequence[Path], indexes: Sequence[Mapping],
               draw: Optional[Draw], note: str):
    self.folder, self.draw, self.note = folder, draw, note
    # A row_uid starts with its part's dataset_id[:12] (see dataset.ShardWriter).
    self.part_of = {index.get("dataset_id", "")[:12]: part for part, index in
                    zip(parts, indexes)}
    self.written: set = set()

  def full_rows(self, uids: Sequence[str]) -> Dict[str, dict]:
    """row_uid -> all columns of those rows (what `draw` needs), read only when drawing.

    A row_uid says where its row is (<dataset_id[:12]>/<shard>#<position>), so only the shards
    that hold them are read, not every column of a dataset of millions of rows."""
    if self.draw is None or not uids:
      return {}
    import pyarrow.parquet as pq
    wanted: Dict[Path, List[Tuple[int, str]]] = {}
    elsewhere = []
    for uid in uids:
      found = re.fullmatch(r"([^/]*)/(shard-\d+\.parquet)#(\d+)", uid or "")
      part = self.part_of.get(found.group(1)) if found else None
      if part is None:
        elsewhere.append(uid)
        continue
      path = part / dataset.SHARD_FOLDER / found.group(2)
      wanted.setdefault(path, []).append((int(found.group(3)), uid))
    rows = {}
    for path, positions in wanted.items():
      shard = pq.read_table(path).take(pa.array([position for position, _ in positions]))
      rows.update(zip((uid for _, uid in positions), shard.to_pylist()))
    if elsewhere:  # not where their row_uid says (not written by ShardWriter): search
      found_rows = dataset.open(self.folder).to_table(filter=pc.field("row_uid").isin(elsewhere))
      rows.update((row["row_uid"], row) for row in found_rows.to_pylist())
    return rows

  def picture(self, row: Mapping, full: Optional[Mapping]) -> Tuple[Optional[str], Optional[str],
                                                                    str]:
    """(thumbnail data URI, relative link to the full picture, why there is none)."""
    if self.draw is not None:
      return self._drawn(full or row)
    stored = _picture_of(row.get("files"))
    if stored is None:
      return None, None, "no picture kept (jflame-report draws one)"
    part = self.part_of.get(str(row.get("row_uid") or "").split("/")[0], self.folder)
    path = _inside(part, stored)
    image = _read_rgb(path) if path is not None and path.is_file() else None
    if image is None:
      return None, None, "picture missing"
    link = (part / stored).relative_to(self.folder).as_posix() if part != self.folder else stored
    return _thumbnail(image), link, ""

  def _drawn(self, row: Mapping) -> Tuple[Optional[str], Optional[str], str]:
    try:
      drawn = self.draw(row)
    except NoPicture as error:
      return None, None, str(error)
    except Exception as error:  # pylint: disable=broad-except
      return None, None, f"not drawn: {error}"  # one picture never costs the page
    image, box = drawn if isinstance(drawn, tuple) else (drawn, None)
    image, scale = fit_within(np.asarray(image, np.uint8), MAX_PICTURE_SIDE)
    if box is not None:
      box = np.asarray(box, np.float64).reshape(2, 2) * np.diag(scale[:, :2])
    data = _jpeg(image, 90)
    if data is None:
      return None, None, "the picture could not be encoded"
    digest = hashlib.blake2b(str(row.get("row_uid") or row.get("id")).encode(
        "utf-8", "surrogateescape"), digest_size=8).hexdigest()
    name = f"{PICTURE_FOLDER}/{digest}.jpg"
    with atomic_path(self.folder / name) as tmp:
      tmp.write_bytes(data)
    self.written.add(name)
    return _thumbnail(image, box=None if box is None else box.reshape(-1)), name, ""

  def remove_stale(self) -> None:
    """Removes the pictures of earlier pages that this page no longer shows."""
    folder = self.folder / PICTURE_FOLDER
    if self.draw is None or not folder.is_dir():
      return
    for path in folder.glob("*.jpg"):
      if f"{PICTURE_FOLDER}/{path.name}" not in self.written:
        path.unlink(missing_ok=True)


def _tile(row: Mapping, picture: Tuple[Optional[str], Optional[str], str]) -> str:
  source, link, why = picture
  image = (f'<img src="{source}" alt="{_e(row["id"])}">' if source else
           f'<div class="missing">{_e(why)}</div>')
  if source and link:
    image = f'<a href="{_e(urllib.parse.quote(link))}">{image}</a>'
  error = row["landmark_error_relative"]
  lines = [f'<div class="id">{_e(row["id"])}</div>',
           f"error {100.0 * error:.2f}% of face size" if error is not None and math.isfinite(
               error) else f"status {_e(row['status'])}"]
  if row["suspect"]:
    lines.append(f'<div class="reason">{_e(row["suspect_reason"])}</div>')
  return f'<div class="tile">{image}<div class="caption">{"".join(lines)}</div></div>'


def _gallery(table: pa.Table, indices: np.ndarray, pictures: _Pictures,
             full: Mapping[str, dict], title: str, note: str, empty: str) -> str:
  if not indices.size:
    return f'<h3>{_e(title)}</h3><div class="empty">{_e(empty)}</div>'
  rows = table.take(pa.array(indices, pa.int64())).to_pylist()
  tiles = "".join(_tile(row, pictures.picture(row, full.get(row["row_uid"]))) for row in rows)
  return (f'<h3>{_e(title)}</h3><p class="note">{note}</p><div class="gallery">{tiles}</div>')


def _galleries(table: pa.Table, pictures: _Pictures, count: int, seed: int) -> str:
  worst, suspect, sample = gallery_indices(table, count, seed)
  shown = np.concatenate([worst, suspect, sample])
  full = pictures.full_rows(table["row_uid"].take(pa.array(shown, pa.int64())).to_pylist())
  if pictures.draw is not None:
    how = ("Drawn for this page from each row's source photo and stored fit: the fitted mesh "
           "(light), detected landmarks (green) and fitted ones (red); click a picture for it "
           f"at up to {MAX_PICTURE_SIDE} pixels.")
  else:
    how = (f"{picture_rows(table).size:,} of {table.num_rows:,} rows have a stored picture "
           "(jflame-annotate <code>--overlays</code>); <code>jflame-report</code> draws the "
           "others.")
  if pictures.note:
    how += f" {_e(pictures.note)}."
  return ("<h2>Fits to look at</h2>" f'<p class="note">{how}</p>'
          + _gallery(table, worst, pictures, full, "Worst fits",
                     "The highest landmark errors among all fitted rows, highest first.",
                     "No fitted rows.")
          + _gallery(table, suspect, pictures, full, "Other suspect fits",
                     "Suspect fits not among the worst above (flagged for their shape, "
                     "expression or convergence), highest landmark error first.",
                     "No other suspect fits.")
          + _gallery(table, sample, pictures, full, "Random fits",
                     "A random sample of the other fitted rows.",
                     "Every fitted row is shown above." if worst.size else "No fitted rows."))


def _page(folder: Path, table: pa.Table, settings: Mapping,
          summaries: Sequence[Tuple[Path, Optional[Mapping]]], pictures: _Pictures,
          gallery_size: int, seed: int) -> str:
  counts = status_counts(table)
  times_ms, rows = commit_times(table)
  missing = source_missing(summaries)
  body = (_header(folder, settings, len(summaries)) + _cards(table, counts, missing)
          + _status_section(table, counts) + _missing_section(missing)
          + _quality_section(table) + _run_section(folder, summaries, times_ms, rows)
          + _galleries(table, pictures, gallery_size, seed))
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          f"<title>jflame report: {_e(folder.resolve().name)}</title>"
          f"<style>{_STYLE}</style></head><body><main>{body}</main></body></html>\n")
