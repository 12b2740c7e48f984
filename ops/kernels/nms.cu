// Bitmask NMS (the Faster R-CNN / torchvision idea, written for this project) for 2D and 3D boxes.
//
// nms_mask_{2d,3d}: boxes are already sorted by rank (score descending, ties by index). Block (col, row)
// of a (cb x cb) grid, cb = ceil(N / 64), 64 threads: the block stages the 64 boxes of tile `col` in
// shared memory; thread t compares box row*64+t with them and sets bit k of
// mask[row*64+t, col] when IoU > thr (and, if use_labels, the labels are equal). Only the upper
// triangle (j > i) is filled; tiles below the diagonal return at once (mask must be zero-initialised).
//
// nms_gather: one block walks the tiles in order and reduces the mask on the device. Thread 0 resolves
// the 64 boxes of the diagonal tile sequentially from shared memory; then all threads OR the rows of the
// boxes kept in that tile into the `removed` words of later tiles. keep[r] = 1 for kept ranks. With
// want_head, head[r] = rank of the kept box whose row first covered r (r itself if kept): these are
// exactly the clusters of greedy weighted box clustering (WBC).
// Dynamic shared memory: cb * 8 bytes.
#include "box_overlap.cuh"

#define NMS_TILE 64

template <int D>
__device__ __forceinline__ void nms_mask_impl(const float* __restrict__ boxes, const long long* __restrict__ labels,
                                              int use_labels, int n, float thr,
                                              unsigned long long* __restrict__ mask) {
  const int row = blockIdx.y;
  const int col = blockIdx.x;
  if (row > col) return;
  const int cb = (n + NMS_TILE - 1) / NMS_TILE;
  const int row_size = min(n - row * NMS_TILE, NMS_TILE);
  const int col_size = min(n - col * NMS_TILE, NMS_TILE);
  __shared__ float sbox[NMS_TILE * 2 * D];
  __shared__ long long slab[NMS_TILE];
  const int t = threadIdx.x;
  if (t < col_size) {
#pragma unroll
    for (int k = 0; k < 2 * D; ++k) sbox[t * 2 * D + k] = boxes[(size_t)(col * NMS_TILE + t) * 2 * D + k];
    slab[t] = use_labels ? labels[col * NMS_TILE + t] : 0LL;
  }
  __syncthreads();
  if (t < row_size) {
    const int i = row * NMS_TILE + t;
    float cur[2 * D];
#pragma unroll
    for (int k = 0; k < 2 * D; ++k) cur[k] = boxes[(size_t)i * 2 * D + k];
    const long long li = use_labels ? labels[i] : 0LL;
    unsigned long long bits = 0ULL;
    const int start = (row == col) ? t + 1 : 0;
    for (int k = start; k < col_size; ++k) {
      if (slab[k] == li && box_iou_pair<D>(cur, sbox + k * 2 * D) > thr) bits |= 1ULL << k;
    }
    mask[(size_t)i * cb + col] = bits;
  }
}

extern "C" __global__ void nms_mask_2d(const float* boxes, const long long* labels, int use_labels, int n,
                                       float thr, unsigned long long* mask) {
  nms_mask_impl<2>(boxes, labels, use_labels, n, thr, mask);
}
extern "C" __global__ void nms_mask_3d(const float* boxes, const long long* labels, int use_labels, int n,
                                       float thr, unsigned long long* mask) {
  nms_mask_impl<3>(boxes, labels, use_labels, n, thr, mask);
}

extern "C" __global__ void nms_gather(const unsigned long long* __restrict__ mask, int n, int cb,
                                      unsigned char* __restrict__ keep, int* __restrict__ head, int want_head) {
  extern __shared__ unsigned long long removed[];
  __shared__ unsigned long long diag[NMS_TILE];
  __shared__ unsigned long long kept_bits;
  const int t = threadIdx.x;
  for (int w = t; w < cb; w += blockDim.x) removed[w] = 0ULL;
  __syncthreads();
  for (int nb = 0; nb < cb; ++nb) {
    const int base = nb * NMS_TILE;
    const int rows = min(n - base, NMS_TILE);
    if (t < rows) diag[t] = mask[(size_t)(base + t) * cb + nb];
    __syncthreads();
    if (t == 0) {
      unsigned long long cur = removed[nb];
      unsigned long long kb = 0ULL;
      for (int k = 0; k < rows; ++k) {
        const unsigned long long bit = 1ULL << k;
        if (cur & bit) {
          keep[base + k] = 0;
          continue;
        }
        kb |= bit;
        keep[base + k] = 1;
        if (want_head) {
          head[base + k] = base + k;
          unsigned long long fresh = diag[k] & ~cur;
          while (fresh) {
            const int b = __ffsll((long long)fresh) - 1;
            fresh &= fresh - 1ULL;
            head[base + b] = base + k;
          }
        }
        cur |= diag[k];
      }
      removed[nb] = cur;
      kept_bits = kb;
    }
    __syncthreads();
    const unsigned long long kb = kept_bits;
    for (int w = nb + 1 + t; w < cb; w += blockDim.x) {
      unsigned long long rem = removed[w];
      unsigned long long todo = kb;
      while (todo) {
        const int k = __ffsll((long long)todo) - 1;
        todo &= todo - 1ULL;
        const unsigned long long rowbits = mask[(size_t)(base + k) * cb + w];
        if (want_head) {
          unsigned long long fresh = rowbits & ~rem;
          while (fresh) {
            const int b = __ffsll((long long)fresh) - 1;
            fresh &= fresh - 1ULL;
            head[w * NMS_TILE + b] = base + k;
          }
        }
        rem |= rowbits;
      }
      removed[w] = rem;
    }
    __syncthreads();
  }
}
