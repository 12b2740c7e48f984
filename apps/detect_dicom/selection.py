"""Series selection by the rules in ``rules.json`` (or ``--rules FILE``): the SDK's matching plus two rules.

The MONAI Deploy SDK's ``DICOMSeriesSelectorOperator`` matches study/series attributes (regular expressions,
multi-value terms, numeric ranges); a series without one of the attributes is not matched. We keep its
matching (its ``filter`` is the documented extension point) and add, per selection, ``min_slices`` (the
fewest instances a series must have) and ``description_excludes`` (a regular expression on
SeriesDescription; series without a description are kept). Every matching series is selected, once, and
what is not selected is reported with the reason.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.deploy.core.domain import StudySelectedSeries
from monai.deploy.operators import DICOMSeriesSelectorOperator

logger = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).with_name("rules.json")
OUR_KEYS = ("min_slices", "description_excludes")


def load_rules(path: str | Path | None = None) -> dict[str, Any]:
    """The selection rules (default: ``rules.json`` beside the app), checked.

    Raises:
        ValueError: not JSON, or no ``selections`` list with ``conditions`` (the message names the file).
    """
    f = Path(path) if path else DEFAULT_RULES
    try:
        rules = json.loads(Path(f).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read the selection rules ({e}); see {DEFAULT_RULES} for the format") from e
    sel = rules.get("selections") if isinstance(rules, Mapping) else None
    if not isinstance(sel, list) or not sel or not all(isinstance(s, Mapping) and s.get("conditions") for s in sel):
        raise ValueError(f"{f}: expected {{\"selections\": [{{\"name\": ..., \"conditions\": {{...}}}}]}}; see "
                         f"{DEFAULT_RULES}")
    for s in sel:
        if s.get("description_excludes"):
            re.compile(s["description_excludes"])
    return dict(rules)


class SeriesSelector(DICOMSeriesSelectorOperator):
    """``DICOMSeriesSelectorOperator`` with every matched series (``all_matched``) and our two extra rules.

    Named input ``dicom_study_list`` (the SDK loader's), named output ``study_selected_series_list``.
    ``self.skipped`` lists the series of the last call that no selection took, with the reason.
    """

    def __init__(self, fragment, *args, rules: Mapping[str, Any], **kwargs) -> None:
        self.rules = dict(rules)
        self.skipped: list[dict[str, str]] = []
        sdk_rules = {"selections": [{k: v for k, v in s.items() if k not in OUR_KEYS} for s in rules["selections"]]}
        super().__init__(fragment, *args, rules=json.dumps(sdk_rules), all_matched=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched: bool = True,
               sort_by_sop_instance_count: bool = False):
        """The SDK's matches of every selection, less the series our rules exclude and repeats, per study.

        ``StudySelectedSeries.selected_series`` is a new flat list on every access (the SDK keeps the series in
        a private dict by selection name), so the kept series go into new ``StudySelectedSeries`` objects;
        studies left without a series are dropped. Sets ``self.skipped`` (a series one selection excludes and
        another takes is selected, not skipped).

        Returns:
            list[StudySelectedSeries]: one per study with a kept series, in the SDK's order.
        """
        matched = super().filter(selection_rules, dicom_study_list, True, sort_by_sop_instance_count)
        by_name = {str(s.get("name", "")).strip(): s for s in self.rules["selections"]}
        self.skipped = []
        kept_uids = set()
        selected = []
        for study_sel in matched:
            kept = StudySelectedSeries(study_sel.study, study_sel.metadata())
            for sel in study_sel.selected_series:
                why = self._extra_rule_failure(by_name.get(sel.selection_name, {}), sel.series)
                uid = str(sel.series.SeriesInstanceUID)
                if why is None and uid not in kept_uids:
                    kept.add_selected_series(sel)
                    kept_uids.add(uid)
                elif why is not None:
                    self.skipped.append(_skip(sel.series, why))
            selected.append(kept)
        self.skipped = [s for s in self.skipped if s["series_instance_uid"] not in kept_uids]  # another one took it
        for study in dicom_study_list or []:
            for series in study.get_all_series():
                uid = str(series.SeriesInstanceUID)
                if uid not in kept_uids and all(s["series_instance_uid"] != uid for s in self.skipped):
                    self.skipped.append(_skip(series, "matches no selection of the rules (modality, image type, ...)"))
        for s in self.skipped:
            logger.info("series %s (%s) not selected: %s", s["series_instance_uid"], s["description"], s["reason"])
        return [s for s in selected if s.selected_series]

    @staticmethod
    def _extra_rule_failure(selection: Mapping[str, Any], series) -> str | None:
        n = len(series.get_sop_instances())
        if selection.get("min_slices") and n < int(selection["min_slices"]):
            return f"{n} instance(s), fewer than min_slices={selection['min_slices']}"
        pattern = selection.get("description_excludes")
        desc = str(getattr(series, "SeriesDescription", "") or "")
        if pattern and desc and re.search(pattern, desc):
            return f"description {desc!r} matches description_excludes {pattern!r}"
        return None


def _skip(series, reason: str) -> dict[str, str]:
    return {"series_instance_uid": str(series.SeriesInstanceUID),
            "description": str(getattr(series, "SeriesDescription", "") or ""), "reason": reason}
