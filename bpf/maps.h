/* BPF maps of the relay's XDP program; userspace fills all but xdp_stats. */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "structs.h"

/* One AF_XDP socket per RX queue; an empty slot makes redirects fall back to XDP_PASS. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

/* Listen endpoints of the configured routes: client traffic the relay takes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LISTEN);
	__type(key, struct endpoint_key);
	__type(value, __u32);
} listen_map SEC(".maps");

/* NAT source addresses: replies to these within the NAT port range are the relay's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_NAT_ADDRS);
	__type(key, struct addr_key);
	__type(value, __u8);
} nat_addrs SEC(".maps");

/* The NAT port range, set once at startup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct relay_config);
} relay_config_map SEC(".maps");

/* Client flows with a live session, kept by the workers: under a flood of new
 * (spoofed) flows these still reach the socket while new ones meet the budget. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u8);
} flows SEC(".maps");

/* Per-CPU token bucket for new client flows. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_budget);
} flow_budget_map SEC(".maps");

/* Per-CPU verdict counters, read and summed by the control thread. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xdp_stats SEC(".maps");
