// Dense pairwise IoU / GIoU matrices out[i, j] = overlap(a[i], b[j]), float32 [N, M], row-major.
// Launch: block (32, 8), grid (ceil(M / 32), ceil(N / 8)); j runs along x so stores are coalesced.
#include "box_overlap.cuh"

template <int D, bool GIOU>
__device__ __forceinline__ void pair_matrix(const float* __restrict__ a, const float* __restrict__ b, int n,
                                            int m, float* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  if (i >= n || j >= m) return;
  float ba[2 * D], bb[2 * D];
#pragma unroll
  for (int k = 0; k < 2 * D; ++k) {
    ba[k] = a[(size_t)i * 2 * D + k];
    bb[k] = b[(size_t)j * 2 * D + k];
  }
  out[(size_t)i * m + j] = GIOU ? box_giou_pair<D>(ba, bb) : box_iou_pair<D>(ba, bb);
}

extern "C" __global__ void box_iou_2d(const float* a, const float* b, int n, int m, float* out) {
  pair_matrix<2, false>(a, b, n, m, out);
}
extern "C" __global__ void box_iou_3d(const float* a, const float* b, int n, int m, float* out) {
  pair_matrix<3, false>(a, b, n, m, out);
}
extern "C" __global__ void box_giou_2d(const float* a, const float* b, int n, int m, float* out) {
  pair_matrix<2, true>(a, b, n, m, out);
}
extern "C" __global__ void box_giou_3d(const float* a, const float* b, int n, int m, float* out) {
  pair_matrix<3, true>(a, b, n, m, out);
}
