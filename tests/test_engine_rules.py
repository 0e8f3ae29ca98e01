"""The engine's rules with a canned fit stage (no preprocessing, no compile): every input exactly
one entry and in order, resume from what the sink holds, a sink error or an interrupt reaching
the caller with what was written kept and the fit stage stopped, sources gone counted."""

import os
import types

import numpy as np
import pytest

from jflame import engine, sinks, sources
from jflame.config import FitConfig
from jflame.fitted_image import FittedImage, source_entry

# What Engine reads of a model when it is given a fit stage: only the summary's description.
CANNED_MODEL = types.SimpleNamespace(
    description="canned", embedding=types.SimpleNamespace(name="canned"),
    model=types.SimpleNamespace(variant=None, is_synthetic=True))
NO_FACE = "no_face"


class CannedFitter:
  """A fit stage that answers every source at once: `ok`, or `no_face` for names in `faceless`;
  it can raise `fail_with` before its batch number `fail_at`, and records what it was asked,
  what it gave and whether it was closed."""

  def __init__(self, batch_size=3, faceless=(), fail_at=None, fail_with=KeyboardInterrupt):
    self.batch_size, self.faceless = batch_size, set(faceless)
    self.fail_at, self.fail_with = fail_at, fail_with
    self.landmark_indices = np.arange(5)
    self.timings = engine.fitter_timings()
    self.buckets_used = set()
    self.given, self.closed = [], False

  def describe(self):
    return dict(device="canned")

  def _fitted(self, source):
    entry = source_entry(source, sources.SourceFacts.of(source.path))
    status = NO_FACE if source.path.name in self.faceless else "ok"
    entry.update(status=status, message="" if status == "ok" else "no face found")
    return FittedImage(record=None, entry=entry)

  def fitted(self, todo):
    try:
      for number, batch in enumerate(engine.batches(todo, self.batch_size)):
        if number == self.fail_at:
          raise self.fail_with("canned failure")
        self.timings["fit_s"] += 0.5
        self.buckets_used.add(engine.bucket_size(len(batch), self.batch_size))
        images = [self._fitted(source) for source in batch]
        self.given.append([image.entry["name"] for image in images])
        yield images
    finally:
      self.closed = True


class KeptSink(sinks.KeptResults):
  """KeptResults whose entries count as committed for the next run; it can fail a write."""

  def __init__(self, committed=None, fail_on_write=None):
    super().__init__()
    self.entries = dict(committed or {})
    self.fail_on_write, self.writes = fail_on_write, 0

  def committed(self):
    return dict(self.entries)

  def write(self, images):
    self.writes += 1
    if self.writes == self.fail_on_write:
      raise OSError("No space left on device (canned)")
    super().write(images)
    self.entries.update((image.entry["name"], image.entry) for image in images)


def _photos(folder, count):
  folder.mkdir(exist_ok=True)
  for index in range(count):
    path = folder / f"photo_{index:02d}.jpg"
    if not path.exists():
      path.write_bytes(b"not decoded by a canned fit %d" % index)
  return sources.list_sources([str(folder)])


def _run(found, sink, fitter, **options):
  return engine.Engine(CANNED_MODEL, FitConfig(), engine.EngineOptions(**options),
                       fitter=fitter).run(found, sink)


def test_every_input_gets_one_entry_in_input_order(tmp_path):
  found = _photos(tmp_path / "in", 8)
  fitter = CannedFitter(batch_size=3, faceless={"photo_04.jpg"})
  sink = KeptSink()
  summary = _run(found, sink, fitter)
  assert [image.entry["name"] for image in sink.images] == [source.name for source in found]
  assert [len(batch) for batch in fitter.given] == [3, 3, 2]
  assert summary["this_run"] == {"ok": 7, NO_FACE: 1}
  assert sink.summary == summary and summary["interrupted"] is None
  assert summary["device"] == "canned" and summary["batch_buckets"] == [2, 3]
  assert summary["timings"]["fit_s"] == 1.5 and summary["timings"]["wall_s"] > 0
  assert summary["source_missing"] == {"count": 0, "ids": []}
  assert fitter.closed


def test_a_rerun_fits_only_new_and_changed_sources(tmp_path):
  found = _photos(tmp_path / "in", 5)
  sink = KeptSink()
  _run(found, sink, CannedFitter())
  changed = found[1].path
  changed.write_bytes(b"a different photo now, longer than before")
  found = _photos(tmp_path / "in", 6)  # and one new
  again = KeptSink(committed=sink.entries)
  fitter = CannedFitter()
  summary = _run(found, again, fitter)
  assert fitter.given == [[found[1].name, found[5].name]]
  assert summary["this_run"] == {"skipped": 4, "ok": 2}
  # --overwrite refits everything, whatever the sink holds
  summary = _run(found, KeptSink(committed=again.entries), CannedFitter(), overwrite=True)
  assert summary["this_run"] == {"ok": 6}


def test_a_touched_but_unchanged_source_is_not_refit(tmp_path):
  found = _photos(tmp_path / "in", 2)
  sink = KeptSink()
  _run(found, sink, CannedFitter())
  entry = sink.entries[found[0].name]
  entry["source_hash"] = sources.content_hash(found[0].path)
  stat = os.stat(found[0].path)
  os.utime(found[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
  fitter = CannedFitter()
  assert _run(found, KeptSink(committed=sink.entries), fitter)["this_run"] == {"skipped": 2}
  assert fitter.given == []


def test_a_sink_error_reaches_the_caller_and_stops_the_fit_stage(tmp_path):
  found = _photos(tmp_path / "in", 30)
  fitter = CannedFitter(batch_size=2)
  sink = KeptSink(fail_on_write=2)
  with pytest.raises(OSError, match="No space left"):
    _run(found, sink, fitter)
  assert [image.entry["name"] for image in sink.images] == [source.name for source in found[:2]]
  assert fitter.closed and len(fitter.given) < 15  # stopped, not run to the end
  assert sink.summary["interrupted"] == "OSError"


def test_an_interrupt_in_the_fit_stage_keeps_what_was_written(tmp_path):
  found = _photos(tmp_path / "in", 9)
  sink = KeptSink()
  with pytest.raises(KeyboardInterrupt):
    _run(found, sink, CannedFitter(batch_size=3, fail_at=2))
  assert [image.entry["name"] for image in sink.images] == [source.name for source in found[:6]]
  assert sink.summary["interrupted"] == "KeyboardInterrupt"
  assert sink.summary["this_run"] == {"ok": 6}
  # the rerun finishes the rest
  fitter = CannedFitter(batch_size=3)
  summary = _run(found, KeptSink(committed=sink.entries), fitter)
  assert fitter.given == [[source.name for source in found[6:]]]
  assert summary["this_run"] == {"skipped": 6, "ok": 3}


def test_rows_whose_source_is_gone_are_counted_not_dropped(tmp_path):
  found = _photos(tmp_path / "in", 4)
  sink = KeptSink()
  _run(found, sink, CannedFitter())
  found[3].path.unlink()            # gone
  listed = sources.list_sources([str(found[0].path), str(found[1].path)])  # 2 not listed, exists
  summary = _run(listed, KeptSink(committed=sink.entries), CannedFitter())
  assert summary["source_missing"] == {"count": 1, "ids": [found[3].name]}
  assert summary["this_run"] == {"skipped": 2}
