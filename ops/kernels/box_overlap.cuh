// Box overlap arithmetic shared by every kernel. It must stay bit-identical to ops/boxes.py
// (iou_elementwise / giou_elementwise): float32, the same operation order, explicit round-to-nearest
// intrinsics so that no multiply-add is contracted into an FMA whatever the compiler flags.
// Boxes are MONAI StandardMode rows (lo_0..lo_{D-1}, hi_0..hi_{D-1}), half-open corners (see ops/boxes.py).
#pragma once

template <int D>
__device__ __forceinline__ void box_inter_union(const float* a, const float* b, float& inter, float& uni) {
  float in = 1.0f, va = 1.0f, vb = 1.0f;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    float w = __fsub_rn(fminf(a[D + k], b[D + k]), fmaxf(a[k], b[k]));
    w = w > 0.0f ? w : 0.0f;
    in = __fmul_rn(in, w);
    va = __fmul_rn(va, __fsub_rn(a[D + k], a[k]));
    vb = __fmul_rn(vb, __fsub_rn(b[D + k], b[k]));
  }
  inter = in;
  uni = __fsub_rn(__fadd_rn(va, vb), in);
}

template <int D>
__device__ __forceinline__ float box_iou_pair(const float* a, const float* b) {
  float inter, uni;
  box_inter_union<D>(a, b, inter, uni);
  return inter > 0.0f ? __fdiv_rn(inter, uni) : 0.0f;
}

template <int D>
__device__ __forceinline__ float box_giou_pair(const float* a, const float* b) {
  float inter, uni;
  box_inter_union<D>(a, b, inter, uni);
  const float iou = inter > 0.0f ? __fdiv_rn(inter, uni) : 0.0f;
  float enc = 1.0f;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    enc = __fmul_rn(enc, __fsub_rn(fmaxf(a[D + k], b[D + k]), fminf(a[k], b[k])));
  }
  const float term = enc > 0.0f ? __fdiv_rn(__fsub_rn(enc, uni), enc) : 0.0f;
  return __fsub_rn(iou, term);
}
