// The CPU kernels compiled again for AVX2 + FMA + F16C, chosen at run time by dispatch.cpp on CPUs
// that have them. Everything shared with the baseline build is included before the target pragma,
// so only code in the capability namespaces (ours and at::vec's) is compiled for AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../kernels/score_math.h"
#include "../kernels/tensor_arg.h"

#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the macros that -mavx2 would define; the vec and
// sleef headers read those.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FP_CPU_NS avx2

#include "score_kernels.cpp"
#include "sq_grads_kernel.cpp"
#endif
