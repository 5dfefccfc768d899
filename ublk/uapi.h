// The ublk driver's user-space ABI: <linux/ublk_cmd.h> plus what a 6.1 header lacks and a
// newer kernel (6.3 and later) offers. Every value added here is #ifndef-guarded, so a newer
// installed header wins; the static_asserts pin the struct layouts this library relies on.
//
// Command encodings: kernels since 6.3 accept ioctl-style opcodes (_IOWR('u', nr, struct))
// for both control and I/O commands, and may reject the bare legacy numbers when built
// without CONFIG_BLKDEV_UBLK_LEGACY_OPCODES; 6.1 and 6.2 understand only the bare numbers.
// The library tries the ioctl form first and falls back to the legacy one (see control.h).
#pragma once

#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/ublk_cmd.h>

// Control commands, ioctl-encoded (sent to /dev/ublk-control through an SQE128 uring_cmd).
#ifndef UBLK_U_CMD_GET_QUEUE_AFFINITY
#define UBLK_U_CMD_GET_QUEUE_AFFINITY \
  _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#endif

// User recovery (6.0 and later): a new server takes over a device whose server died.
#ifndef UBLK_U_CMD_START_USER_RECOVERY
#define UBLK_U_CMD_START_USER_RECOVERY \
  _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY \
  _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#endif

// I/O commands, ioctl-encoded (sent to /dev/ublkcN through a uring_cmd).
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ \
  _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#endif

// Feature flags newer than 6.1.
#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV (1ULL << 5)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#endif

#ifndef UBLK_S_DEV_FAIL_IO
#define UBLK_S_DEV_FAIL_IO 3
#endif

// The kernel maps the descriptor array of queue q at this offset of /dev/ublkcN: one slot of
// the largest possible array (UBLK_MAX_QUEUE_DEPTH descriptors, page-rounded) per queue.
#ifndef UBLK_MAX_NR_QUEUES
#define UBLK_MAX_NR_QUEUES (1U << 12)
#endif

static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "ublksrv_ctrl_cmd layout");
static_assert(sizeof(struct ublksrv_ctrl_dev_info) == 64, "ublksrv_ctrl_dev_info layout");
static_assert(sizeof(struct ublksrv_io_desc) == 24, "ublksrv_io_desc layout");
static_assert(sizeof(struct ublksrv_io_cmd) == 16, "ublksrv_io_cmd layout");
static_assert(sizeof(struct ublk_param_basic) == 32, "ublk_param_basic layout");
static_assert(sizeof(struct ublk_param_discard) == 20, "ublk_param_discard layout");
