"""Preprocessing (crop, transpose, resample, normalise as nnDetection's ``nndet_prep``): the bundle's MONAI
transform chain applied offline to every case."""

from planner.preprocess.run import load_preprocessing, preprocess_case, preprocess_task, unpack

__all__ = ["load_preprocessing", "preprocess_case", "preprocess_task", "unpack"]
