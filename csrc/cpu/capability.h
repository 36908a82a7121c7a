// Which CPU instruction set the kernel files are being compiled for. The kernel files are compiled
// twice: plainly (namespace `baseline`, any x86-64 or other CPU) and from avx2.cpp with AVX2, FMA
// and F16C enabled (namespace `avx2`). dispatch.cpp picks one at run time.
#pragma once

#ifndef FP_CPU_NS
#define FP_CPU_NS baseline
#endif
