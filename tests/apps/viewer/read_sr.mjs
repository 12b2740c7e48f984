// Headless check of how OHIF 3.13 reads a TID 1500 SR: the real Cornerstone3D SR adapters
// (@cornerstonejs/adapters 5.6.8, with dcmjs 0.52.0 and @cornerstonejs/core 5.6.8, the versions
// @ohif/extension-cornerstone-dicom-sr 3.13.13 depends on) turn the SR into Cornerstone tool state.
//
//   node read_sr.mjs SR.dcm IMAGES_DIR
//
// prints one JSON object on stdout:
//   tools:  {toolType: [{trackingIdentifier, trackingUniqueIdentifier, sopInstanceUID, points (world LPS mm,
//           Cornerstone handle order: RectangleROI = [top-left, top-right, bottom-left, bottom-right]),
//           pixelPoints (the same points as DICOM (column, row), see pixelPoint), label, finding}, ...]}
//   counts: {toolType: n};  groups: OHIF's own look at each measurement group (see ohifGroup);
//   rehydratable: OHIF's isRehydratable;  errors: groups the adapter could not read, and other problems.
// It exits 1 with a message on stderr when the SR or the images cannot be read or generateToolState throws.
//
// What OHIF 3.13.13 does (read from its published bundle), mirrored here:
// * getSopClassHandlerModule: measurement groups are keyed by Tracking Unique Identifier (a group without one
//   throws); each group's first SCOORD gives graphicCode "<scheme>:<value>" of its concept name, GraphicType
//   and point count; isRehydratable is true when a group's TrackingIdentifier text names an adapter
//   (MeasurementReport.getAdapterForTrackingIdentifier) OR MeasurementReport.getAdaptersForTypes(graphicCode,
//   graphicType, pointsLength) gives one (RectangleROI registers "DCM:111030-POLYLINE-4" and "-5").
// * hydrateStructuredReport: MeasurementReport.generateToolState(instance, {"<SOPInstanceUID>:<frame>": imageId},
//   metaData) -- no hooks -- and keeps only tool types OHIF has measurement mappings for (OHIF_MAPPINGS).
// * generateToolState picks each group's adapter by (1) hooks.getToolClass (none in OHIF), (2) the Tracking
//   Identifier text: exact "Cornerstone3DTools@^0.1.0:RectangleROI", legacy "cornerstoneTools@^4.0.0:
//   RectangleROI", or any text with a ':' starting with the former, (3) else the first adapter whose
//   isValidMeasurement(group) is true: RectangleROI's is "the group's first top-level SCOORD is a POLYLINE
//   of 4 or 5 points" (only Probe has another test: POINT). A plain "Finding 1" thus comes back a RectangleROI.
// * The coordinates are read from the SCOORD inside the group's FIRST NUM (any relationship; our SR uses
//   INFERRED FROM) -- the top-level SCOORD only when the group has no NUM at all; a NUM without one makes the
//   group fail ("No spatial coordinates group found"). That SCOORD's own ContentSequence must hold the
//   ReferencedSOPSequence (SELECTED FROM) of the image; ReferencedFrameNumber defaults to 1. With 5 points
//   the last is dropped and the handles are [p0, p1, p3, p2].
// * Pixel -> world is @cornerstonejs/core utilities.imageToWorldCoords with OHIF's imagePlaneModule
//   (rowPixelSpacing = PixelSpacing[0], columnPixelSpacing = PixelSpacing[1]):
//   world = IPP + rowCosines * rowPixelSpacing * (x - 0.5) + columnCosines * columnPixelSpacing * (y - 0.5).
//   The -0.5 matches DICOM's SCOORD origin (top-left corner of the top-left pixel), but the spacing axes are
//   swapped (cornerstone3D issue #2758): correct only for square pixels.

import fs from 'node:fs';
import path from 'node:path';

// The adapters console.log every measurement and console.warn per failed group: keep stdout for our JSON.
const errors = [];
const debug = process.env.VIEWER_DEBUG ? (...a) => console.error(...a) : () => {};
console.log = console.info = console.debug = debug;
console.warn = (...a) => {
  const err = a.find(x => x instanceof Error);
  errors.push(`${a[0]}${err ? `: ${err.message}` : ''}`);
  debug(...a);
};

const fail = msg => {
  process.stderr.write(`read_sr.mjs: ${msg}\n`);
  process.exit(1);
};

const [srPath, imagesDir] = process.argv.slice(2);
if (!srPath || !imagesDir) fail('usage: node read_sr.mjs SR.dcm IMAGES_DIR');

const dcmjs = (await import('dcmjs')).default;
const { adaptersSR } = await import('@cornerstonejs/adapters');
const { metaData, utilities } = await import('@cornerstonejs/core');
const { MeasurementReport } = adaptersSR.Cornerstone3D;
const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

// Tool types OHIF 3.13.13's cornerstone extension maps into its measurement service (others are dropped).
const OHIF_MAPPINGS = new Set(['Angle', 'ArrowAnnotate', 'Bidirectional', 'CalibrationLine', 'CircleROI',
  'CobbAngle', 'Crosshairs', 'EllipticalROI', 'Length', 'LivewireContour', 'PlanarFreehandROI', 'Probe',
  'RectangleROI', 'SegmentBidirectional', 'SplineROI', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool']);

// dcmjs: DICOM file -> naturalized dataset (keyword properties; sequences are arrays whose single item's
// attributes are also readable on the array itself, as OHIF's code relies on).
function readDataset(file, untilPixelData = false) {
  const buf = fs.readFileSync(file);
  const opts = untilPixelData ? { untilTag: '7FE00010', includeUntilTagValue: false } : {};
  const dict = DicomMessage.readFile(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength), opts);
  return DicomMetaDictionary.naturalizeDataset(dict.dict);
}

let sr;
try {
  sr = readDataset(srPath);
} catch (e) {
  fail(`cannot parse SR ${srPath}: ${e.message}`);
}

// The referenced images: one imageId per single-frame instance ("dicomfile:<SOPInstanceUID>").
const images = new Map(); // imageId -> naturalized dataset (no pixel data)
const sopToImageId = {}; // "<SOPInstanceUID>:<frame>" -> imageId, the map OHIF passes
const walk = dir => fs.readdirSync(dir, { withFileTypes: true }).flatMap(d =>
  d.isDirectory() ? walk(path.join(dir, d.name)) : [path.join(dir, d.name)]);
let files;
try {
  files = walk(imagesDir).filter(f => f.toLowerCase().endsWith('.dcm') && path.resolve(f) !== path.resolve(srPath));
} catch (e) {
  fail(`cannot list ${imagesDir}: ${e.message}`);
}
for (const file of files) {
  let ds;
  try {
    ds = readDataset(file, true);
  } catch (e) {
    errors.push(`cannot parse image ${file}: ${e.message}`);
    continue;
  }
  if (!ds.ImagePositionPatient || !ds.ImageOrientationPatient) continue; // not an image plane (e.g. an SR)
  const imageId = `dicomfile:${ds.SOPInstanceUID}`;
  images.set(imageId, ds);
  sopToImageId[`${ds.SOPInstanceUID}:1`] = imageId;
}
if (!images.size) fail(`no image instances with an image plane in ${imagesDir}`);

const num = v => (Array.isArray(v) ? v.map(Number) : Number(v));
// Metadata provider: the modules the adapters ask for, imagePlaneModule as OHIF's MetadataProvider builds it.
metaData.addProvider((type, imageId) => {
  const ds = images.get(imageId);
  if (!ds) return undefined;
  const iop = num(ds.ImageOrientationPatient);
  const ps = ds.PixelSpacing ? num(ds.PixelSpacing) : [1, 1];
  switch (type) {
    case 'imagePlaneModule':
      return {
        frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
        imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3, 6),
        imagePositionPatient: num(ds.ImagePositionPatient), pixelSpacing: ps,
        rowPixelSpacing: ps[0], columnPixelSpacing: ps[1], sliceThickness: num(ds.SliceThickness),
      };
    case 'instance':
      return ds;
    case 'sopCommonModule':
      return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
    case 'generalSeriesModule':
      return { seriesInstanceUID: ds.SeriesInstanceUID, studyInstanceUID: ds.StudyInstanceUID, modality: ds.Modality };
    default:
      return undefined;
  }
}, 10000);

// World LPS -> DICOM pixel (column, row), origin at the top-left corner of the top-left pixel (PS3.3
// C.18.6.1.1): the correct inverse, so a test compares it with the SR's GraphicData directly.
function pixelPoint(imageId, p) {
  const pl = metaData.get('imagePlaneModule', imageId);
  const d = p.map((v, i) => v - pl.imagePositionPatient[i]);
  const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
  return [dot(d, pl.rowCosines) / pl.pixelSpacing[1] + 0.5, dot(d, pl.columnCosines) / pl.pixelSpacing[0] + 0.5];
}

const items = seq => (seq === undefined ? [] : Array.isArray(seq) ? seq : [seq]);
const concept = item => items(item.ConceptNameCodeSequence)[0] || {};
const groupsOf = ds => {
  const report = items(ds.ContentSequence).find(i => concept(i).CodeValue === '126010'); // Imaging Measurements
  return report ? items(report.ContentSequence).filter(i => concept(i).CodeValue === '125007') : []; // Meas. Group
};

// OHIF's sop class handler view of one measurement group (see header).
function ohifGroup(group) {
  const content = items(group.ContentSequence);
  const text = content.find(i => concept(i).CodeValue === '112039'); // Tracking Identifier
  const uid = content.find(i => concept(i).CodeValue === '112040'); // Tracking Unique Identifier
  const scoord = content.find(i => i.ValueType === 'SCOORD' || i.ValueType === 'SCOORD3D');
  const out = { trackingIdentifier: text?.TextValue ?? null, trackingUniqueIdentifier: uid?.UID ?? null };
  if (!uid) errors.push(`OHIF: measurement group "${out.trackingIdentifier}" has no Tracking Unique Identifier`);
  if (scoord) {
    const c = concept(scoord);
    Object.assign(out, {
      graphicCode: `${c.CodingSchemeDesignator}:${c.CodeValue}`, graphicType: scoord.GraphicType,
      pointsLength: items(scoord.GraphicData).length / (scoord.ValueType === 'SCOORD3D' ? 3 : 2),
    });
  }
  out.adapterByTrackingIdentifier = MeasurementReport.getAdapterForTrackingIdentifier(out.trackingIdentifier ?? '')
    ?.toolType ?? null;
  out.adaptersByType = scoord
    ? MeasurementReport.getAdaptersForTypes(out.graphicCode, out.graphicType, out.pointsLength).map(a => a.toolType)
    : [];
  out.rehydratable = [out.adapterByTrackingIdentifier, ...out.adaptersByType].some(t => OHIF_MAPPINGS.has(t));
  return out;
}

const groups = groupsOf(sr).map(ohifGroup);
const textByUid = Object.fromEntries(groups.map(g => [g.trackingUniqueIdentifier, g.trackingIdentifier]));

let state;
try {
  // The exact call of OHIF 3.13.13's hydrateStructuredReport.
  state = MeasurementReport.generateToolState(sr, sopToImageId, metaData);
} catch (e) {
  fail(`generateToolState failed: ${e.message}`);
}

const tools = {};
const counts = {};
for (const [toolType, list] of Object.entries(state)) {
  counts[toolType] = list.length;
  tools[toolType] = list.map(m => {
    const imageId = m.annotation?.metadata?.referencedImageId;
    const points = (m.annotation?.data?.handles?.points || []).map(p => Array.from(p, Number));
    return {
      trackingIdentifier: textByUid[m.TrackingUniqueIdentifier] ?? null,
      trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
      sopInstanceUID: m.sopInstanceUid ?? null, referencedImageId: imageId ?? null,
      frameNumber: m.annotation?.data?.frameNumber ?? null,
      points, pixelPoints: imageId && images.has(imageId) ? points.map(p => pixelPoint(imageId, p)) : null,
      label: m.annotation?.data?.label ?? null, finding: m.description ?? null,
      hydratedByOHIF: OHIF_MAPPINGS.has(toolType),
    };
  });
}

process.stdout.write(`${JSON.stringify({ tools, counts, groups, rehydratable: groups.some(g => g.rehydratable),
  errors })}\n`);
