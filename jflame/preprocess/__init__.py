"""Host-side preprocessing: photographs -> `PreparedImage` records -> batched `Observation`.

    found = jflame.sources.list_sources(["photos/"])
    with Preprocessor(crop_size=256, workers=2) as preprocessor:
      records = preprocessor.prepare([s.path for s in found], [s.name for s in found])
    observation = stack_observations(records[:batch_size], batch_size, crop_size=256)

Nothing here runs inside jit.
"""

from jflame.preprocess.align import DEFAULT_CROP_SCALE
from jflame.preprocess.batch import stack_observations
from jflame.preprocess.image_io import IMAGE_EXTENSIONS, read_image
from jflame.preprocess.mediapipe_face import (NUM_LANDMARKS, AnalyzerOptions, FaceAnalyzer,
                                              FaceDetection)
from jflame.preprocess.pipeline import (DEFAULT_CROP_SIZE, STATUS_ANALYSIS_FAILED, STATUS_NO_FACE,
                                        STATUS_OK, STATUS_UNREADABLE, PreparedImage,
                                        Preprocessor, prepare_image, prepare_images)
