/* Cursor-style header parsers: each checks bounds, advances, and returns the header or NULL. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>

#include "consts.h"

struct cursor {
	void *pos;
	void *end;
};

struct vlan_tag {
	__be16 tci;
	__be16 inner_proto;
};

/* Ethernet plus at most one 802.1Q tag; stores the inner ethertype (host order). */
static __always_inline struct ethhdr *parse_ethhdr(struct cursor *c, __u16 *ethertype)
{
	struct ethhdr *eth = c->pos;
	if ((void *)(eth + 1) > c->end)
		return NULL;
	c->pos = eth + 1;
	*ethertype = bpf_ntohs(eth->h_proto);
	if (*ethertype == ETH_P_8021Q) {
		struct vlan_tag *tag = c->pos;
		if ((void *)(tag + 1) > c->end)
			return NULL;
		c->pos = tag + 1;
		*ethertype = bpf_ntohs(tag->inner_proto);
	}
	return eth;
}

/* IPv4 header including options; the cursor lands on the transport header. */
static __always_inline struct iphdr *parse_iphdr(struct cursor *c)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > c->end)
		return NULL;
	__u32 header_len = ip->ihl * 4;
	if (ip->version != 4 || header_len < sizeof(*ip))
		return NULL;
	if (c->pos + header_len > c->end)
		return NULL;
	c->pos += header_len;
	return ip;
}

/* Fixed IPv6 header only: extension headers are left to the caller to reject. */
static __always_inline struct ipv6hdr *parse_ipv6hdr(struct cursor *c)
{
	struct ipv6hdr *ip6 = c->pos;
	if ((void *)(ip6 + 1) > c->end)
		return NULL;
	if (ip6->version != 6)
		return NULL;
	c->pos = ip6 + 1;
	return ip6;
}

static __always_inline struct udphdr *parse_udphdr(struct cursor *c)
{
	struct udphdr *udp = c->pos;
	if ((void *)(udp + 1) > c->end)
		return NULL;
	c->pos = udp + 1;
	return udp;
}
