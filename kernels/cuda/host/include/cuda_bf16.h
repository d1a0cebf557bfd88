// NVRTC's cuda_bf16.h on the host harness: __nv_bfloat16 and its conversions (cuda_host.h).
#pragma once
#include "../cuda_host.h"
