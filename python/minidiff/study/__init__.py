"""The study: a base model vs its compressed variants, on prediction errors,
representations, data distribution (and adversarial vulnerability), with a cache,
a report and a command line. See :class:`Study` and :mod:`minidiff.study.config`
for the study-file format."""

from .config import StudyConfig, StudyFileError, load_config, parse_config
from .results import SCHEMA, OutputWriteError
from .study import Study, build_study, report_from_cache

__all__ = ["Study", "build_study", "StudyConfig", "StudyFileError", "load_config", "parse_config", "report_from_cache",
           "SCHEMA", "OutputWriteError"]
