/* A stand-in for libnvidia-ml.so.1, for benchmarks on machines without a GPU.
 *
 * Built at bench time (gcc -shared -fPIC -O2 -o libnvidia-ml.so.1 fake_libnvidia_ml.c) and
 * found through LD_LIBRARY_PATH, so that every exporter under test loads it through pynvml's
 * normal path and pays what a real NVML call costs a Python program (ctypes), not the cost of
 * a fake written in Python. It answers the calls mlwarden's exporter and nvitop-exporter make,
 * with the same readings as tests/fake_nvml.py; any other symbol is absent, which pynvml
 * reports as NVML_ERROR_FUNCTION_NOT_FOUND (an old driver), as it would be on a real machine.
 *
 * Environment: MLWARDEN_FAKE_NVML_GPUS (default 8), MLWARDEN_FAKE_NVML_PIDS (comma-separated
 * PIDs every GPU lists as compute processes; default: 10 PIDs that do not exist),
 * MLWARDEN_FAKE_NVML_XIDS (comma-separated GPU:XID events the event wait hands out, one a wait, after
 * each nvmlInit; default: none, every wait times out).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
    OK = 0, ERR_UNINITIALIZED = 1, ERR_INVALID_ARGUMENT = 2, ERR_NOT_SUPPORTED = 3,
    ERR_NOT_FOUND = 6, ERR_INSUFFICIENT_SIZE = 7, ERR_TIMEOUT = 10,
};
#define MAX_GPUS 1024
#define MAX_PIDS 1024
#define NVLINKS 2 /* link 1 is down */
#define MIB (1024ULL * 1024ULL)

typedef struct { unsigned index; } gpu_t;
static gpu_t gpus[MAX_GPUS];
static unsigned gpu_count = 8;
static unsigned pids[MAX_PIDS];
static unsigned pid_count;
static int initialised;
#define MAX_XIDS 64
static unsigned xid_gpu[MAX_XIDS], xid_code[MAX_XIDS], xid_count, xid_next;

static void configure(void) {
    const char *count = getenv("MLWARDEN_FAKE_NVML_GPUS");
    if (count) gpu_count = (unsigned)atoi(count);
    if (gpu_count > MAX_GPUS) gpu_count = MAX_GPUS;
    for (unsigned i = 0; i < MAX_GPUS; i++) gpus[i].index = i;
    pid_count = 0;
    const char *list = getenv("MLWARDEN_FAKE_NVML_PIDS");
    if (list && *list) {
        char *copy = strdup(list), *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok && pid_count < MAX_PIDS; tok = strtok_r(NULL, ",", &save))
            pids[pid_count++] = (unsigned)atoi(tok);
        free(copy);
    } else {
        for (unsigned k = 0; k < 10; k++) pids[pid_count++] = 4000000 + k;
    }
    xid_count = xid_next = 0;
    const char *xids = getenv("MLWARDEN_FAKE_NVML_XIDS");
    if (xids && *xids) {
        char *copy = strdup(xids), *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok && xid_count < MAX_XIDS; tok = strtok_r(NULL, ",", &save)) {
            unsigned gpu, code;
            if (sscanf(tok, "%u:%u", &gpu, &code) == 2 && gpu < gpu_count) {
                xid_gpu[xid_count] = gpu;
                xid_code[xid_count++] = code;
            }
        }
        free(copy);
    }
}

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

#define GPU(h) ((const gpu_t *)(h))
#define CHECK(h) do { if (!initialised) return ERR_UNINITIALIZED; if (!(h)) return ERR_INVALID_ARGUMENT; } while (0)

/* system ------------------------------------------------------------------------------- */
nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; configure(); initialised = 1; return OK; }
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) { initialised = 0; return OK; }

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case OK: return "Success";
    case ERR_UNINITIALIZED: return "Uninitialized";
    case ERR_INVALID_ARGUMENT: return "Invalid Argument";
    case ERR_NOT_SUPPORTED: return "Not Supported";
    case ERR_NOT_FOUND: return "Not Found";
    case ERR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case ERR_TIMEOUT: return "Timeout";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_text(char *out, unsigned length, const char *text) {
    if (!out || length <= strlen(text)) return ERR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return OK;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *out, unsigned length) { return copy_text(out, length, "550.54.15"); }
nvmlReturn_t nvmlSystemGetNVMLVersion(char *out, unsigned length) { return copy_text(out, length, "12.550.54.15"); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) { *version = 12040; return OK; }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { *version = 12040; return OK; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) { if (!initialised) return ERR_UNINITIALIZED; *count = gpu_count; return OK; }
nvmlReturn_t nvmlDeviceGetCount(unsigned *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) {
    if (!initialised) return ERR_UNINITIALIZED;
    if (index >= gpu_count) return ERR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return OK;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned index, void **device) { return nvmlDeviceGetHandleByIndex_v2(index, device); }

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **device) {
    unsigned index;
    if (sscanf(uuid, "GPU-fake-%u", &index) != 1) return ERR_NOT_FOUND;
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetIndex(void *h, unsigned *index) { CHECK(h); *index = GPU(h)->index; return OK; }

/* identity ----------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetUUID(void *h, char *out, unsigned length) {
    CHECK(h);
    char text[96];
    snprintf(text, sizeof text, "GPU-fake-%u", GPU(h)->index);
    return copy_text(out, length, text);
}
nvmlReturn_t nvmlDeviceGetName(void *h, char *out, unsigned length) { CHECK(h); return copy_text(out, length, "NVIDIA H100 80GB HBM3"); }

typedef struct {
    char busIdLegacy[16];
    unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} pci_info_t;

nvmlReturn_t nvmlDeviceGetPciInfo_v3(void *h, pci_info_t *pci) {
    CHECK(h);
    memset(pci, 0, sizeof *pci);
    pci->bus = GPU(h)->index + 0x18;
    pci->pciDeviceId = 0x233010DE;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return OK;
}
nvmlReturn_t nvmlDeviceGetPciInfo_v2(void *h, pci_info_t *pci) { return nvmlDeviceGetPciInfo_v3(h, pci); }
nvmlReturn_t nvmlDeviceGetPciInfo(void *h, pci_info_t *pci) { return nvmlDeviceGetPciInfo_v3(h, pci); }

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *h, unsigned *is_mig) { CHECK(h); *is_mig = 0; return OK; }
nvmlReturn_t nvmlDeviceGetMigMode(void *h, unsigned *current, unsigned *pending) { CHECK(h); *current = *pending = 0; return OK; }
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(void *h, int *major, int *minor) { CHECK(h); *major = 9; *minor = 0; return OK; }

/* readings (NVML's units: mW, mJ, MHz, percent) ------------------------------------------ */
nvmlReturn_t nvmlDeviceGetTemperature(void *h, int sensor, unsigned *celsius) { CHECK(h); (void)sensor; *celsius = 60 + GPU(h)->index; return OK; }

typedef struct { unsigned gpu, memory; } utilization_t;
nvmlReturn_t nvmlDeviceGetUtilizationRates(void *h, utilization_t *u) { CHECK(h); u->gpu = 50; u->memory = 25; return OK; }

typedef struct { unsigned long long total, free, used; } memory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } memory_v2_t;
nvmlReturn_t nvmlDeviceGetMemoryInfo(void *h, memory_t *m) {
    CHECK(h);
    m->total = 80000 * MIB; m->used = 30000 * MIB; m->free = 49500 * MIB;
    return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *h, memory_v2_t *m) {
    CHECK(h);
    m->total = 80000 * MIB; m->reserved = 500 * MIB; m->used = 30000 * MIB; m->free = 49500 * MIB;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(void *h, unsigned *mw) { CHECK(h); *mw = 250000; return OK; }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *h, unsigned *mw) { CHECK(h); *mw = 700000; return OK; }
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(void *h, unsigned *mw) { CHECK(h); *mw = 700000; return OK; }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *h, unsigned long long *mj) { CHECK(h); *mj = 1500000; return OK; }
nvmlReturn_t nvmlDeviceGetFanSpeed(void *h, unsigned *percent) { CHECK(h); *percent = 40; return OK; }
nvmlReturn_t nvmlDeviceGetFanSpeed_v2(void *h, unsigned fan, unsigned *percent) { CHECK(h); (void)fan; *percent = 40; return OK; }
nvmlReturn_t nvmlDeviceGetNumFans(void *h, unsigned *fans) { CHECK(h); *fans = 1; return OK; }
nvmlReturn_t nvmlDeviceGetPerformanceState(void *h, int *pstate) { CHECK(h); *pstate = 0; return OK; }
nvmlReturn_t nvmlDeviceGetPowerState(void *h, int *pstate) { CHECK(h); *pstate = 0; return OK; }

nvmlReturn_t nvmlDeviceGetClockInfo(void *h, int clock, unsigned *mhz) {
    CHECK(h);
    static const unsigned by_type[] = {1980, 1980, 2619, 1755}; /* graphics, SM, memory, video */
    if (clock < 0 || clock > 3) return ERR_INVALID_ARGUMENT;
    *mhz = by_type[clock];
    return OK;
}
nvmlReturn_t nvmlDeviceGetMaxClockInfo(void *h, int clock, unsigned *mhz) { return nvmlDeviceGetClockInfo(h, clock, mhz); }

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(void *h, unsigned long long *mask) { CHECK(h); *mask = 0x40 | 0x4; return OK; }
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(void *h, unsigned long long *mask) { CHECK(h); *mask = 0x40 | 0x4; return OK; }

nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *h, int error_type, int counter, unsigned long long *count) {
    CHECK(h); (void)counter;
    *count = error_type == 0 ? 3 : 0; /* corrected : uncorrected */
    return OK;
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(void *h, unsigned *gen) { CHECK(h); *gen = 5; return OK; }
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(void *h, unsigned *width) { CHECK(h); *width = 16; return OK; }
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(void *h, unsigned *gen) { CHECK(h); *gen = 5; return OK; }
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(void *h, unsigned *width) { CHECK(h); *width = 16; return OK; }

nvmlReturn_t nvmlDeviceGetRetiredPages(void *h, int cause, unsigned *count, unsigned long long *addresses) {
    CHECK(h); (void)cause; (void)addresses;
    *count = 0;
    return OK;
}
nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(void *h, int *pending) { CHECK(h); *pending = 0; return OK; }
nvmlReturn_t nvmlDeviceGetRemappedRows(void *h, unsigned *corr, unsigned *unc, unsigned *pending, unsigned *failure) {
    CHECK(h);
    *corr = 2; *unc = 0; *pending = 0; *failure = 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPcieThroughput(void *h, int counter, unsigned *kb_per_s) { CHECK(h); *kb_per_s = counter == 0 ? 1000 : 2000; return OK; }
nvmlReturn_t nvmlDeviceGetPcieReplayCounter(void *h, unsigned *count) { CHECK(h); *count = 3; return OK; }
nvmlReturn_t nvmlDeviceGetEncoderUtilization(void *h, unsigned *percent, unsigned *period_us) { CHECK(h); *percent = 12; *period_us = 167000; return OK; }
nvmlReturn_t nvmlDeviceGetDecoderUtilization(void *h, unsigned *percent, unsigned *period_us) { CHECK(h); *percent = 34; *period_us = 167000; return OK; }

typedef struct { unsigned long long referenceTime, violationTime; } violation_t;
nvmlReturn_t nvmlDeviceGetViolationStatus(void *h, int policy, violation_t *v) {
    CHECK(h);
    if (policy == 5) return ERR_NOT_SUPPORTED; /* reliability */
    v->referenceTime = 1;
    v->violationTime = policy == 0 ? 2500000000ULL : 0; /* power */
    return OK;
}

/* NVLink ------------------------------------------------------------------------------- */
nvmlReturn_t nvmlDeviceGetNvLinkState(void *h, unsigned link, int *active) {
    CHECK(h);
    if (link >= NVLINKS) return ERR_INVALID_ARGUMENT;
    *active = link == 1 ? 0 : 1;
    return OK;
}
nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(void *h, unsigned link, int counter, unsigned long long *count) {
    CHECK(h);
    if (link >= NVLINKS) return ERR_INVALID_ARGUMENT;
    if (counter == 4) return ERR_NOT_SUPPORTED; /* ECC data */
    *count = counter == 0 ? 5 : 0; /* replay */
    return OK;
}

typedef union { double dVal; unsigned uiVal; unsigned long ulVal; unsigned long long ullVal; long long sllVal; int siVal; unsigned short usVal; } value_t;
typedef struct {
    uint32_t fieldId, scopeId;
    int64_t timestamp, latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    value_t value;
} field_value_t;

nvmlReturn_t nvmlDeviceGetFieldValues(void *h, int count, field_value_t *values) {
    CHECK(h);
    int64_t now = (int64_t)now_us();
    for (int i = 0; i < count; i++) {
        field_value_t *f = &values[i];
        unsigned link = f->scopeId;
        f->timestamp = now;
        f->latencyUsec = 0;
        f->nvmlReturn = OK;
        f->valueType = 3; /* unsigned long long */
        switch (f->fieldId) {
        case 82: f->valueType = 1; f->value.uiVal = 70; break;              /* memory temperature */
        /* the same counters the calls above answer, with the value types an H200 (driver 580) answers */
        case 3: case 5: f->value.ullVal = 3; break;                          /* ECC single-bit (corrected) */
        case 4: case 6: f->value.ullVal = 0; break;                          /* ECC double-bit (uncorrected) */
        case 74: f->value.ullVal = 2500000000ULL; break;                     /* violation time, power (ns) */
        case 75: case 76: case 77: case 78: case 80: case 81: f->value.ullVal = 0; break;
        case 83: f->value.ullVal = 1500000; break;                           /* energy (mJ) */
        case 94: f->valueType = 1; f->value.uiVal = 3; break;                /* PCIe replays */
        case 197: f->value.ullVal = 1000000000ULL; break;                    /* PCIe TX bytes */
        case 198: f->value.ullVal = 2000000000ULL; break;                    /* PCIe RX bytes */
        case 138: case 140:                                                   /* NVLink TX (data, raw), KiB */
            if (link < NVLINKS) f->value.ullVal = 1000ULL * (link + 1); else f->nvmlReturn = ERR_INVALID_ARGUMENT;
            break;
        case 139: case 141:                                                   /* NVLink RX */
            if (link < NVLINKS) f->value.ullVal = 3000ULL * (link + 1); else f->nvmlReturn = ERR_INVALID_ARGUMENT;
            break;
        default: f->nvmlReturn = ERR_NOT_SUPPORTED; f->value.ullVal = 0;
        }
    }
    return OK;
}

/* processes ---------------------------------------------------------------------------- */
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gpuInstanceId, computeInstanceId; } process_info_t;

static nvmlReturn_t list_processes(unsigned *count, process_info_t *infos) {
    if (*count < pid_count || !infos) {
        *count = pid_count;
        return pid_count ? ERR_INSUFFICIENT_SIZE : OK;
    }
    for (unsigned k = 0; k < pid_count; k++) {
        infos[k].pid = pids[k];
        infos[k].usedGpuMemory = (k + 1) * 512 * MIB;
        infos[k].gpuInstanceId = infos[k].computeInstanceId = 0xFFFFFFFF;
    }
    *count = pid_count;
    return OK;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned *count, process_info_t *infos) { CHECK(h); return list_processes(count, infos); }
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(void *h, unsigned *count, process_info_t *infos) { CHECK(h); return list_processes(count, infos); }
static nvmlReturn_t no_processes(void *h, unsigned *count) { CHECK(h); *count = 0; return OK; }
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(void *h, unsigned *count, process_info_t *infos) { (void)infos; return no_processes(h, count); }
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(void *h, unsigned *count, process_info_t *infos) { (void)infos; return no_processes(h, count); }
nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(void *h, unsigned *count, process_info_t *infos) { (void)infos; return no_processes(h, count); }

typedef struct { unsigned pid; unsigned long long timeStamp; unsigned smUtil, memUtil, encUtil, decUtil; } process_sample_t;
nvmlReturn_t nvmlDeviceGetProcessUtilization(void *h, process_sample_t *samples, unsigned *count, unsigned long long since) {
    CHECK(h); (void)since;
    if (!samples || *count < pid_count) {
        *count = pid_count;
        return pid_count ? ERR_INSUFFICIENT_SIZE : ERR_NOT_FOUND;
    }
    unsigned long long now = now_us();
    for (unsigned k = 0; k < pid_count; k++) {
        samples[k] = (process_sample_t){pids[k], now, 10 + k, 5 + k, 0, 0};
    }
    *count = pid_count;
    return OK;
}

/* GPM (Hopper and later) ----------------------------------------------------------------- */
typedef struct { unsigned version, isSupportedDevice; } gpm_support_t;
typedef struct { const gpu_t *gpu; uint64_t taken; } gpm_sample_t;
typedef struct { const char *shortName, *longName, *unit; } metric_info_t;
typedef struct { unsigned metricId; nvmlReturn_t nvmlReturn; double value; metric_info_t metricInfo; } gpm_metric_t;
typedef struct { unsigned version, numMetrics; gpm_sample_t *sample1, *sample2; gpm_metric_t metrics[477]; } gpm_metrics_get_t;

nvmlReturn_t nvmlGpmQueryDeviceSupport(void *h, gpm_support_t *support) { CHECK(h); support->isSupportedDevice = 1; return OK; }
nvmlReturn_t nvmlGpmSampleAlloc(gpm_sample_t **sample) { *sample = calloc(1, sizeof **sample); return *sample ? OK : 2; }
nvmlReturn_t nvmlGpmSampleFree(gpm_sample_t *sample) { free(sample); return OK; }
nvmlReturn_t nvmlGpmSampleGet(void *h, gpm_sample_t *sample) {
    CHECK(h);
    sample->gpu = GPU(h);
    sample->taken = now_us();
    return OK;
}

static double gpm_percent(unsigned metric, int *known) {
    *known = 1;
    switch (metric) {
    case 1: return 90.0;   /* graphics */
    case 2: return 42.0;   /* SM activity */
    case 3: return 25.0;   /* SM occupancy */
    case 5: return 30.0;   /* any tensor */
    case 10: return 55.0;  /* DRAM bandwidth */
    case 11: return 0.0;   /* FP64 */
    case 12: return 12.5;  /* FP32 */
    case 13: return 5.0;   /* FP16 */
    case 20: return 100.0; /* PCIe TX, MiB/s */
    case 21: return 200.0; /* PCIe RX */
    case 60: return 2000.0; /* NVLink RX */
    case 61: return 1000.0; /* NVLink TX */
    default: *known = 0; return 0.0;
    }
}

nvmlReturn_t nvmlGpmMetricsGet(gpm_metrics_get_t *request) {
    if (request->version != 1) return 25; /* NVML_ERROR_ARGUMENT_VERSION_MISMATCH */
    if (!request->sample1 || !request->sample2 || request->sample1->gpu != request->sample2->gpu) return ERR_INVALID_ARGUMENT;
    for (unsigned i = 0; i < request->numMetrics && i < 477; i++) {
        int known;
        request->metrics[i].value = gpm_percent(request->metrics[i].metricId, &known);
        request->metrics[i].nvmlReturn = known ? OK : ERR_NOT_SUPPORTED;
    }
    return OK;
}

/* XID events: those of MLWARDEN_FAKE_NVML_XIDS, then none; a wait without one blocks for its timeout, as NVML's does */
typedef struct { void *device; unsigned long long eventType, eventData; unsigned gpuInstanceId, computeInstanceId; } event_data_t;
static int event_set_token;

nvmlReturn_t nvmlEventSetCreate(void **set) { *set = &event_set_token; return OK; }
nvmlReturn_t nvmlEventSetFree(void *set) { (void)set; return OK; }
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(void *h, unsigned long long *types) { CHECK(h); *types = 0x8; return OK; }
nvmlReturn_t nvmlDeviceRegisterEvents(void *h, unsigned long long types, void *set) { CHECK(h); (void)types; (void)set; return OK; }
nvmlReturn_t nvmlEventSetWait_v2(void *set, event_data_t *data, unsigned timeout_ms) {
    (void)set;
    if (xid_next < xid_count) {
        data->device = &gpus[xid_gpu[xid_next]];
        data->eventType = 0x8; /* nvmlEventTypeXidCriticalError */
        data->eventData = xid_code[xid_next++];
        data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
        return OK;
    }
    struct timespec pause = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    return ERR_TIMEOUT;
}
