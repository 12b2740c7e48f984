// CPU build of one kernel file of ops/kernels for tests/ops/test_emulated_kernels.py (see
// cuda_emulation.h). Built once per kernel file into its own shared library, with -DEMU_IOU or -DEMU_NMS
// and -I <dir holding iou.cu / nms.cu as ops.cuda.kernel_source gives them, local headers inlined>.
#include "cuda_emulation.h"

#if defined(EMU_IOU)
#include "iou.cu"

EMU_EXPORT_KERNEL(box_iou_2d)
EMU_EXPORT_KERNEL(box_iou_3d)
EMU_EXPORT_KERNEL(box_giou_2d)
EMU_EXPORT_KERNEL(box_giou_3d)

#elif defined(EMU_NMS)
// nms_gather's `extern __shared__ unsigned long long removed[];`
EMU_DYNAMIC_SHARED(unsigned long long, removed);
#include "nms.cu"

EMU_EXPORT_KERNEL(nms_mask_2d)
EMU_EXPORT_KERNEL(nms_mask_3d)
EMU_EXPORT_KERNEL(nms_gather)

#else
#error "define EMU_IOU or EMU_NMS"
#endif

EMU_EXPORT_RUNTIME()
