"""What a finished fit is: one image's entry (source facts, status, quality, timings) and its
arrays (the result record), built in one place for every engine and every sink."""

import dataclasses
from typing import Mapping, Optional

import numpy as np

from jflame import output, quality
from jflame.fit import FittedMeshes, FitResult
from jflame.preprocess import PreparedImage
from jflame.sources import Source, SourceFacts

STATUS_FIT_FAILED = "fit_failed"
FIT_FAILED_MESSAGE = ("the optimisation diverged (non-finite loss or gradient); the last finite "
                      "values were discarded and nothing was written")


@dataclasses.dataclass
class FittedImage:
  """One image after the fit, what a Sink writes.

  Attributes:
    record: the preprocessing record (status ok or a failure).
    entry: the manifest entry / table row scalars: name, source facts, status, message,
      quality and timings.
    result: this image's FitResult (host arrays), None unless the fit succeeded.
    meshes: this image's FittedMeshes, None unless the fit succeeded.
    arrays: `output.result_record` of a successful fit, else None.
  """
  record: PreparedImage
  entry: dict
  result: Optional[FitResult] = None
  meshes: Optional[FittedMeshes] = None
  arrays: Optional[dict] = None

  @property
  def ok(self) -> bool:
    return self.entry["status"] == "ok"


def source_entry(source: Source, facts: Optional[SourceFacts]) -> dict:
  return dict(name=source.name, source=str(source.path), source_relpath=source.relpath,
              source_size=facts.size if facts else None,
              source_mtime_ns=facts.mtime_ns if facts else None, source_hash=None)


def describe_fit(record: PreparedImage, source: Source, result, meshes,
                 context: Mapping) -> FittedImage:
  """A record and its fit (this image's slices of the batch's host arrays; None when it was not
  fitted) as a FittedImage: its entry and, for a fit, its `output.result_record` with the
  source facts and the quality measures.

  Args:
    context: model_name, mode, crop_size, landmark_indices and albedo_name of the run.
  """
  entry = source_entry(source, SourceFacts.of(source.path))
  for key in ("source_size", "source_mtime_ns", "source_hash"):
    value = getattr(record, key, None)
    if value is not None:
      entry[key] = value
  entry.update(status=record.status, message=record.message, num_faces=record.num_faces,
               image_width=record.image_width, image_height=record.image_height)
  if not record.ok:
    return FittedImage(record=record, entry=entry)
  if not bool(result.fitted):
    entry.update(status=STATUS_FIT_FAILED, message=FIT_FAILED_MESSAGE)
    return FittedImage(record=record, entry=entry)
  arrays = output.result_record(
      record, result, model_name=context["model_name"], mode=context["mode"],
      crop_size=context["crop_size"], landmark_indices=context["landmark_indices"],
      albedo_name=context["albedo_name"])
  # The last stage that ran: Adam's full stage, or the landmark solve when it did all the work.
  history = arrays["full_loss_history"]
  if np.size(history) == 0:
    history = arrays["rigid_loss_history"]
  measures = quality.fit_quality(
      arrays["landmark_error_relative"], arrays["shape"], arrays["expression"], history,
      upright_score=getattr(record, "upright_score", None),
      landmarks_outside=1.0 - float(np.mean(arrays["landmark_weights"] > 0)))
  entry.update(landmark_error_px=arrays["landmark_error_px"], **measures.as_dict())
  arrays.update({key: entry[key] for key in ("source", "source_relpath", "source_size",
                                              "source_mtime_ns", "source_hash")
                 if entry[key] is not None})
  arrays.update(measures.as_dict())
  return FittedImage(record=record, entry=entry, result=result, meshes=meshes, arrays=arrays)
