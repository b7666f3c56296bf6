/* Constants shared by the XDP program and mirrored in src/sys/bpf_abi.rs. */
#pragma once

#define MAX_QUEUES 256
#define MAX_LISTEN 1024
#define MAX_NAT_ADDRS 64
/* Default size of the established-flows map; userspace sizes it to the session capacity. */
#define MAX_FLOWS 65536

#define ADDR_FAMILY_IPV4 4
#define ADDR_FAMILY_IPV6 6

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define IPPROTO_UDP_NUM 17
#define IPPROTO_ICMP_NUM 1
#define IPPROTO_ICMPV6_NUM 58
/* IPv6 extension headers walked to find UDP behind them, at most MAX_IPV6_EXTENSIONS deep. */
#define IPV6_HOP_BY_HOP 0
#define IPV6_ROUTING 43
#define IPV6_FRAGMENT 44
#define IPV6_DEST_OPTIONS 60
#define MAX_IPV6_EXTENSIONS 4

/* Index of each counter in the xdp_stats map; order mirrored in Rust. */
enum xdp_counter {
	XDP_CNT_PASS_NOT_IP = 0,      /* ARP, LLDP, ...: kernel's business */
	XDP_CNT_PASS_NOT_UDP,         /* TCP (SSH), ICMP, ... */
	XDP_CNT_PASS_OTHER_PORT,      /* UDP not addressed to the relay */
	XDP_CNT_PASS_UNPARSED,        /* truncated or non-first fragment: kernel decides */
	XDP_CNT_REDIRECT_LISTEN,      /* client traffic handed to the AF_XDP socket */
	XDP_CNT_REDIRECT_NAT,         /* upstream replies handed to the AF_XDP socket */
	XDP_CNT_PASS_NO_SOCKET,       /* relay traffic, but no socket on this queue */
	XDP_CNT_DROP_BAD_UDP_LENGTH,  /* relay-bound with a UDP length that lies */
	XDP_CNT_DROP_IP_OPTIONS,      /* relay-bound with IPv4 options */
	XDP_CNT_DROP_FRAGMENT,        /* relay-bound first fragment */
	XDP_CNT_DROP_NEW_FLOW_BUDGET, /* a new client flow beyond the new-flow budget (flood shedding) */
	XDP_CNT_DROP_IPV6_EXTENSION,  /* relay-bound IPv6 with extension headers before UDP */
	XDP_CNT_DROP_TOO_BIG,         /* relay-bound frame longer than an AF_XDP frame holds */
	XDP_CNT_REDIRECT_ICMP,        /* an ICMP error about a datagram the relay sent from a NAT port */
	XDP_CNT_MAX,
};
