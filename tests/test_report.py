"""report.html: counts that match the table, the worst fits in order, escaped data, embedded
thumbnails, nothing fetched from the network, and pages for empty, tiny and large datasets."""

import base64
import re
import time

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest

from jflame import dataset, report

SETTINGS = {"model": "test model", "mode": "landmark"}
SCRIPT_ID = '<script>alert("x")</script>.png'


def _row(name, status="ok", error=None, suspect=False, reason="", files=(), message=""):
  """A hand-made row with the columns the report reads (the others stay null)."""
  row = dict(id=name, status=status, message=message, files=list(files))
  if status == "ok":
    row.update(landmark_error_relative=error, shape_prior_sigma=0.5 + error,
               expression_prior_sigma=1.0, convergence=0.01, suspect=suspect,
               suspect_reason=reason, fit_ms=12.0)
  return row


def _picture(folder, name, size=(300, 400)):
  rng = np.random.default_rng(len(name))
  image = rng.integers(0, 255, size + (3,), dtype=np.uint8)
  path = folder / "pictures" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), image)
  return f"pictures/{name}"


def _write(folder, rows, rows_per_shard=1000):
  writer = dataset.ShardWriter(folder, SETTINGS, rows_per_shard=rows_per_shard)
  writer.add(rows)
  writer.commit()


def _section(page, start, end):
  return page[page.index(start):page.index(end)]


def _gallery_ids(section):
  return re.findall(r'<div class="id">(.*?)</div>', section)


@pytest.fixture(name="folder")
def _folder(tmp_path):
  """A dataset of ok, suspect and failed rows; two real pictures, one listed but missing."""
  folder = tmp_path / "ds"
  a, b = _picture(folder, "a_overlay.png"), _picture(folder, "b_overlay.png")
  rows = [_row("a.png", error=0.010, files=[a]),
          _row("b.png", error=0.080, suspect=True,
               reason="landmark error 8.0% of face size > 5%", files=[b]),
          _row(SCRIPT_ID, error=0.120, suspect=True,
               reason="landmark error 12.0% of face size > 5%; shape 3.4 sigma from the mean > 3",
               files=[a]),
          _row("gone.png", error=0.030, files=["pictures/gone_overlay.png"]),
          _row("worst_no_picture.png", error=0.900, suspect=True,
               reason="landmark error 90.0% of face size > 5%"),
          _row("mesh_only.png", error=0.500, files=["meshes/mesh_only.obj"]),
          _row("c.png", error=0.020)]
  rows += [_row(f"dark{i}.png", "no_face", message="no face found") for i in range(3)]
  rows += [_row("broken.png", "unreadable", message="cannot decode <b>image</b>")]
  _write(folder, rows, rows_per_shard=4)
  return folder


def test_counts_match_the_table(folder):
  page = report.write_report(folder).read_text()
  table = dataset.open(folder).to_table(columns=["status"])
  counts = pc.value_counts(table["status"]).to_pylist()
  assert len(counts) == 3
  for pair in counts:
    assert re.search(rf'>{pair["values"]}</b></td><td class="n">{pair["counts"]:,}</td>', page)
  assert f'>{table.num_rows}</div><div class="what">rows' in page
  status = _section(page, "<h2>Status", "<h2>Quality")
  assert "no face found" in status and "cannot decode &lt;b&gt;image&lt;/b&gt;" in status


def test_worst_fits_are_the_highest_errors_with_a_picture_in_order(folder):
  page = report.write_report(folder).read_text()
  worst = _gallery_ids(_section(page, "<h3>Worst fits", "<h3>Random fits"))
  # 'worst_no_picture' has no files and 'mesh_only' only a mesh: not in the gallery.
  assert worst == ['&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;.png', "b.png",
                   "gone.png", "a.png"]
  assert "picture missing" in page  # gone.png's file was never written
  # Two of them a gallery of two shows, the others none: nothing left for the random sample.
  two = report.write_report(folder, gallery_size=2).read_text()
  assert len(_gallery_ids(_section(two, "<h3>Worst fits", "<h3>Random fits"))) == 2
  assert len(_gallery_ids(two[two.index("<h3>Random fits"):])) == 2


def test_data_is_escaped_and_the_page_is_self_contained(folder):
  page = report.write_report(folder).read_text()
  assert "<script" not in page
  assert "&lt;script&gt;" in page
  assert not re.search(r"https?://", page)
  assert not re.search(r'<link|@import|url\(', page)
  sources = re.findall(r'<img src="([^"]+)"', page)
  assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
  thumbnail = cv2.imdecode(np.frombuffer(base64.b64decode(sources[0].split(",", 1)[1]),
                                         np.uint8), cv2.IMREAD_COLOR)
  assert max(thumbnail.shape[:2]) == report.THUMBNAIL_SIZE


def test_suspect_reasons_group_without_their_numbers(folder):
  table = dataset.open(folder).to_table(columns=list(report.COLUMNS))
  reasons = dict(report.suspect_reasons(table))
  assert reasons == {"landmark error …% of face size > 5%": 3,
                     "shape … sigma from the mean > 3": 1}


def test_a_folder_without_rows_gets_a_page(tmp_path):
  page = report.write_report(tmp_path).read_text()
  assert "no rows yet" in page and "No rows committed yet" in page
  assert (tmp_path / "report.html").is_file()


def test_only_failures_and_no_pictures(tmp_path):
  _write(tmp_path, [_row(f"x{i}.png", "no_face", message="no face found") for i in range(4)])
  page = report.write_report(tmp_path).read_text()
  assert "Landmark error: no fitted rows." in page
  assert "No fitted rows with pictures." in page and "No rows with pictures." in page
  assert '>no_face</b></td><td class="n">4</td>' in page


def test_one_row(tmp_path):
  _write(tmp_path, [_row("only.png", error=0.02, files=[_picture(tmp_path, "only.png")])])
  page = report.write_report(tmp_path).read_text()
  assert "one shard commit" in page
  assert _gallery_ids(_section(page, "<h3>Worst fits", "<h3>Random fits")) == ["only.png"]


def test_throughput_spreads_each_shard_over_its_interval():
  minute = 60000
  times = np.array([0, 2, 4, 6, 40, 42]) * minute + 1_700_000_000_000
  rows = np.full(times.size, 1000)
  # Every shard took the usual 2 minutes, the one after the pause too; the first starts at -2.
  assert report.commit_intervals(times).tolist() == [[0, 2], [2, 4], [4, 6], [6, 8], [40, 42],
                                                     [42, 44]]
  charts = report.throughput_svgs(times, rows)
  assert charts.count("<svg") == 2 and "rows per minute" in charts
  rates = re.findall(r"<title>([\d.]+) rows/min</title>", charts)
  assert rates and set(rates) == {"500.0"}  # 1000 rows in 2 minutes, in 1-minute bars


def test_hundred_thousand_rows_take_seconds(tmp_path):
  rng = np.random.default_rng(0)
  picture = _picture(tmp_path, "p.png")
  errors = rng.gamma(2.0, 0.01, 100_000).astype(np.float32)  # as the table stores them
  rows = [dict(id=f"img{i:06d}.jpg", status="ok", landmark_error_relative=float(e),
               shape_prior_sigma=0.5, expression_prior_sigma=0.8, convergence=0.01,
               suspect=bool(e > 0.05), suspect_reason="landmark error 6.0% of face size > 5%"
               if e > 0.05 else "", files=[picture] if i % 500 == 0 else [])
          for i, e in enumerate(errors)]
  rows[7].update(status="no_face", message="no face found", landmark_error_relative=None)
  _write(tmp_path, rows, rows_per_shard=25_000)
  started = time.perf_counter()
  page = report.write_report(tmp_path).read_text()
  elapsed = time.perf_counter() - started
  assert elapsed < 15, elapsed  # a few column reads; generous for a busy machine
  assert '>ok</b></td><td class="n">99,999</td>' in page
  worst = _gallery_ids(_section(page, "<h3>Worst fits", "<h3>Random fits"))
  with_pictures = np.arange(0, 100_000, 500)
  expected = with_pictures[np.argsort(-errors[with_pictures], kind="stable")][:12]
  assert worst == [f"img{i:06d}.jpg" for i in expected]
  assert len(page) < 2_000_000  # thumbnails only for the galleries


def test_progress_total_is_counted_for_folders_never_for_list_files(tmp_path):
  """jflame-annotate's progress bar: a total (and so an ETA) where listing is cheap."""
  from jflame import sources
  for name in ("a.png", "b.jpg", "notes.md"):
    (tmp_path / name).write_bytes(b"")
  listing = tmp_path / "list.txt"
  listing.write_text("a.png\nb.jpg\n")
  folder_inputs = [str(tmp_path / "*.png"), str(tmp_path / "b.jpg")]
  assert sources.cheap_count(folder_inputs, sources.iter_sources(folder_inputs)) == 2
  assert sources.cheap_count([str(listing)], iter([1, 2])) is None
  assert sources.cheap_count(["x"], iter(range(10_000)), seconds=0.0) is None  # too slow
