/* Map key and value layouts; each is mirrored by a #[repr(C)] struct in src/sys/bpf_abi.rs. */
#pragma once

#include <linux/types.h>

/* An address and UDP port the relay answers on; addr all-zero means any address. */
struct endpoint_key {
	__u8 family;      /* ADDR_FAMILY_IPV4 or ADDR_FAMILY_IPV6 */
	__u8 pad;
	__be16 port;
	__u8 addr[16];    /* IPv4 uses the first four bytes */
};

/* A local address the relay uses as the source toward upstreams (its NAT address). */
struct addr_key {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

/* A client flow the relay has a session for: it bypasses the new-flow budget. */
struct flow_key {
	__u8 family;
	__u8 pad;
	__be16 src_port;
	__be16 dst_port;
	__u16 pad2;
	__u8 src_addr[16];
};

/* Relay-wide settings, one entry. */
struct relay_config {
	__u16 nat_port_first; /* host byte order */
	__u16 nat_port_last;
	__u32 new_flows_per_second; /* per CPU; 0 = no budget */
	__u32 max_frame_len;        /* longest frame an AF_XDP frame holds; 0 = no limit */
	__u32 pad;
};

/* The new-flow token bucket of one CPU. */
struct flow_budget {
	__u64 tokens;  /* in new flows, scaled by 1000 */
	__u64 last_ns;
};
