"""jflame-annotate: fit FLAME to a whole dataset of photographs into a columnar store.

  jflame-annotate --input photos/ --output annotations/ [--mode landmark] [--batch_size 64]
                  [--workers N] [--overlays sample] [--meshes] [--num_shards 8 --shard_index 3]
                  [--engine ray [--ray_address auto]]

--input takes folders (searched recursively), glob patterns and list files (.txt, one path per
line, read as a stream). Every input gets exactly one row in Parquet shards under
<output>/shards, committed atomically every --rows_per_shard rows and listed in
<output>/index.json; read them with `jflame.dataset.open(output)`. The format is documented in
docs/FORMAT.md. A rerun of the same command finishes what is missing: committed rows are kept
(an input is redone only if its file changed), and a kill at any moment loses at most the rows
not yet committed. A second run into the same output is refused while the first holds it.

With --num_shards N (job arrays: Slurm, Kubernetes) each task fits the inputs whose name hashes
to its --shard_index and writes <output>/part-<index>-of-<N>; `jflame.dataset.open(output)`
reads all parts. Under jax.distributed the process index and count are the defaults.

At the end (also after a run that had nothing left to do) <output>/report.html is written: one
self-contained page with status counts, quality histograms, throughput and galleries of the
worst, the other suspect and random fits, drawn from their sources whatever --overlays was
(`jflame.report`; --noreport skips it). In a split run each part writes its own page, and the
part that finishes when every part has finished writes <output>/report.html about them all;
`jflame-report <output>` writes it at any time. The progress bar shows
images/s; it shows a total and an ETA when the inputs are folders or patterns that list within
a couple of seconds, never for list files, which are streamed (see `sources.cheap_count`).
Skipped inputs (already in the dataset) count as progress too.

With --engine=ray (pip install 'jflame[ray]') the same run spreads over a Ray cluster:
preprocessing as CPU tasks, the fits in actors with a GPU each (one per GPU), the rows written
by this process into the same shards; the inputs must be at the same paths on every node.

Exit status: 0 when the dataset holds at least one fitted row, 1 when none, 2 for a usage
problem.
"""

import hashlib
import os
import sys
from pathlib import Path

from absl import flags

from jflame.cli import common, model_flags

_INPUT = flags.DEFINE_list("input", None, "Folder(s) (recursive), glob pattern(s) or list "
                           "file(s) (.txt, one image path per line).")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder (created if missing).")
_WORKERS = flags.DEFINE_integer("workers", None, "Preprocessing worker processes of the local "
                                "engine (default: all cores but one).", lower_bound=1,
                                upper_bound=256)
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 1000, "Rows per Parquet shard: a "
                                       "kill loses at most this many.", lower_bound=1,
                                       upper_bound=1_000_000)
_MESHES = flags.DEFINE_bool("meshes", False, "Also write meshes/<name>.obj per fitted image.")
_OVERLAYS = flags.DEFINE_enum("overlays", "sample", ["none", "sample", "failures", "all"],
                              "Pictures of the fit: none; a sample of about 1 in 500 plus every "
                              "suspect fit; failures (suspect fits); all.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Refit every input, also those whose row was made from the same file "
    "(each new row replaces the old one); also continues a dataset of an older jflame format.")
_REPORT = flags.DEFINE_bool("report", True, "Write <output>/report.html at the end: status "
                            "counts, quality histograms, throughput, worst and random fits.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Split the input over this many tasks "
                                   "(default: the JAX process count, else 1).", lower_bound=1)
_SHARD_INDEX = flags.DEFINE_integer("shard_index", None, "This task's part, 0..num_shards-1 "
                                    "(default: the JAX process index, else 0).", lower_bound=0)
_ENGINE = flags.DEFINE_enum("engine", "local", ["local", "ray"], "local: this machine's "
                            "workers and devices; ray: preprocessing as CPU tasks over a Ray "
                            "cluster and the fits in GPU actors (pip install 'jflame[ray]').")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", None, "With --engine=ray: the cluster to join "
                                   "('auto', 'ray://head:10001'); default: $RAY_ADDRESS, else "
                                   "a Ray started on this machine.")


def _shard_of(name: str, count: int) -> int:
  digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % count


def _task_split():
  """(shard index, shard count) from the flags, else from jax.distributed, else (0, 1)."""
  count, index = _NUM_SHARDS.value, _SHARD_INDEX.value
  if count is None and index is None:
    import jax
    try:
      return jax.process_index(), jax.process_count()
    except RuntimeError:
      return 0, 1
  count = count or 1
  index = index or 0
  if index >= count:
    raise ValueError(f"--shard_index {index} must be below --num_shards {count}")
  return index, count


def _progress_bar(total):
  """A tqdm bar in images/s (never s/image), with a total and an ETA when `total` is known."""
  from tqdm import tqdm
  if total is None:
    form = "{desc}: {n_fmt} images [{elapsed}, {rate_noinv_fmt}{postfix}]"
  else:
    form = ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} left, "
            "{rate_noinv_fmt}{postfix}]")
  return tqdm(total=total, unit="image", desc="jflame-annotate", smoothing=0.1, bar_format=form)


def _write_report(folder, draw):
  """report.html in `folder` (a dataset, or a split run's output), its galleries drawn by
  `draw` (`row_pictures.row_drawer`); or None with a warning: a report that fails costs the
  page, never the dataset that was just committed."""
  from jflame import report
  try:
    return report.write_report(folder, draw=draw)
  except Exception as error:  # pylint: disable=broad-except
    print(f"warning: report.html not written in {folder}: {error!r}", file=sys.stderr)
    return None


def _ray_engine():
  """jflame.ray_engine, or None when Ray is not installed."""
  try:
    from jflame import ray_engine
  except ImportError as error:
    if (error.name or "").split(".")[0] != "ray":
      raise
    return None
  return ray_engine


def _make_engine(loaded, config, options, progress, cache, ray_engine):
  if ray_engine is None:
    from jflame import engine
    return engine.Engine(loaded, config, options, progress=progress)
  ray_engine.connect(_RAY_ADDRESS.value)
  return ray_engine.engine_on_ray(loaded, config, options, progress, compilation_cache=cache)


def main(argv) -> int:
  if len(argv) > 1:
    return common.usage_error(f"unexpected arguments {argv[1:]}; name inputs with --input.")
  common.quiet_logging()
  if not _INPUT.value or not _OUTPUT.value:
    return common.usage_error("--input and --output are required.")
  ray_engine = None
  if _RAY_ADDRESS.value and _ENGINE.value != "ray":
    return common.usage_error("--ray_address is for --engine=ray.")
  if _ENGINE.value == "ray":
    ray_engine = _ray_engine()
    if ray_engine is None:
      return common.usage_error("--engine=ray needs Ray: pip install 'jflame[ray]'.")
  from jflame import output_folder, process_settings, sinks, sources
  from jflame.errors import JFlameError
  try:
    index, count = _task_split()
  except ValueError as error:
    return common.usage_error(str(error))
  output = Path(_OUTPUT.value).expanduser()
  folder_name = output if count == 1 else output / f"part-{index:04d}-of-{count:04d}"
  workers = _WORKERS.value or max(1, (os.cpu_count() or 2) - 1)
  try:
    sources.check_output_not_an_input(_INPUT.value, output, recursive=True)

    def source_stream():
      stream = sources.iter_sources(_INPUT.value, recursive=True, exclude_folder=output)
      if count > 1:
        stream = (source for source in stream if _shard_of(source.name, count) == index)
      return stream

    total = sources.cheap_count(_INPUT.value, source_stream())
    stream = source_stream()
    with output_folder.claim_output_folder(folder_name) as folder:
      cache = common.enable_compilation_cache()
      if ray_engine is None:
        process_settings.fit_beside_workers(workers)
      loaded = model_flags.load_model()
      config = common.fit_config()
      print(f"model: {loaded.description}", flush=True)
      options = common.engine_options(workers, config, _ENGINE.value,
                                      overwrite=_OVERWRITE.value)
      with _progress_bar(total) as bar:
        run = _make_engine(loaded, config, options, bar.update, cache, ray_engine)
        sink = sinks.DatasetSink(
            folder, loaded.model.faces, loaded.model.name,
            sinks.dataset_settings(loaded, config, options.crop_size, run.landmark_indices),
            rows_per_shard=_ROWS_PER_SHARD.value, meshes=_MESHES.value,
            overlays=_OVERLAYS.value, retire_older_format=_OVERWRITE.value)
        summary = common.run_until_interrupted(
            run, stream, sink, bar, f"every committed shard is kept in {folder}")
        if summary is None:
          return common.EXIT_INTERRUPTED
      page = whole = None
      if _REPORT.value:
        from jflame import report, row_pictures
        draw = row_pictures.row_drawer(loaded.model)
        page = _write_report(folder, draw)
        # Every part finished: this one came last (or at the same time), so it reports on all.
        if count > 1 and report.all_parts_finished(output):
          whole = _write_report(output, draw)
  except JFlameError as error:
    return common.usage_error(str(error))
  counts = sink.writer.status_counts()
  print(f"done: this run {summary['this_run']}; the dataset holds {counts} -> {folder}"
        + (f"; report: {page}" if page else "")
        + (f" (compilation cache: {cache})" if cache else "") + common.missing_note(summary))
  if count > 1:
    print(f"whole dataset (all {count} parts): " + (
        f"report: {whole}" if whole else f"once every part has finished, jflame-report {output}"
        " writes its report.html"))
  return common.EXIT_OK if counts.get("ok", 0) else common.EXIT_NOTHING_FITTED


def run():
  common.run_command(main, __name__, __doc__)


if __name__ == "__main__":
  run()
