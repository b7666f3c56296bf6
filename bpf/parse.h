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

struct ipv6_ext {
	__u8 nexthdr;
	__u8 len;     /* in 8-byte units, not counting the first 8 (fragment header: reserved) */
	__be16 frag;  /* fragment header only: offset and M flag */
};

/* Walks IPv6 extension headers (hop-by-hop, routing, destination options, fragment) up to
 * the transport header. Stores the transport protocol, how many headers were walked and
 * whether a fragment header was met (*fragment: 1 first fragment, 2 later one); NULL if cut short. */
static __always_inline void *skip_ipv6_extensions(struct cursor *c, __u8 *nexthdr, int *walked, int *fragment)
{
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXTENSIONS; i++) {
		if (*nexthdr != IPV6_HOP_BY_HOP && *nexthdr != IPV6_ROUTING && *nexthdr != IPV6_FRAGMENT &&
		    *nexthdr != IPV6_DEST_OPTIONS)
			return c->pos;
		struct ipv6_ext *ext = c->pos;
		if ((void *)(ext + 1) > c->end)
			return NULL;
		__u32 length = 8;
		if (*nexthdr == IPV6_FRAGMENT)
			*fragment = (bpf_ntohs(ext->frag) & 0xfff8) ? 2 : 1;
		else
			length = ((__u32)ext->len + 1) * 8;
		if (c->pos + length > c->end)
			return NULL;
		*nexthdr = ext->nexthdr;
		c->pos += length;
		*walked += 1;
	}
	return c->pos;
}

static __always_inline struct udphdr *parse_udphdr(struct cursor *c)
{
	struct udphdr *udp = c->pos;
	if ((void *)(udp + 1) > c->end)
		return NULL;
	c->pos = udp + 1;
	return udp;
}
