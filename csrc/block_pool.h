// Big fp32 CPU tensors from a small cache of recently freed blocks (see block_pool.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace fastvq {

// An uninitialised contiguous fp32 CPU tensor whose memory comes from the block cache.
at::Tensor empty_big(at::IntArrayRef sizes);

}  // namespace fastvq
