/* XDP program: hand the relay's UDP traffic to AF_XDP sockets, pass everything else to the kernel. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"

/* IPv4 flags/fragment offset: MF bit and the offset field (DF is fine). */
#define IP_MF_AND_OFFSET 0x3fff
#define IP_OFFSET 0x1fff

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&xdp_stats, &counter);
	if (value)
		*value += 1;
}

static __always_inline int pass(__u32 counter)
{
	count(counter);
	return XDP_PASS;
}

static __always_inline int drop(__u32 counter)
{
	count(counter);
	return XDP_DROP;
}

/* Is dst (family, addr, port) a listen endpoint, exact or wildcard? */
static __always_inline int is_listen(struct endpoint_key *key)
{
	if (bpf_map_lookup_elem(&listen_map, key))
		return 1;
	__builtin_memset(key->addr, 0, sizeof(key->addr));
	return bpf_map_lookup_elem(&listen_map, key) != NULL;
}

/* Is dst a NAT port on one of the relay's NAT addresses? */
static __always_inline int is_nat(const struct endpoint_key *dst)
{
	__u32 zero = 0;
	struct relay_config *config = bpf_map_lookup_elem(&relay_config_map, &zero);
	if (!config)
		return 0;
	__u16 port = bpf_ntohs(dst->port);
	if (port < config->nat_port_first || port > config->nat_port_last)
		return 0;
	struct addr_key addr = { .family = dst->family };
	__builtin_memcpy(addr.addr, dst->addr, sizeof(addr.addr));
	return bpf_map_lookup_elem(&nat_addrs, &addr) != NULL;
}

/* Tokens are new flows x 1000; a full bucket holds a quarter second of budget. */
#define BUDGET_BURST_MS 250

/* Whether a client packet may reach the socket: established flows always, new ones within the budget. */
static __always_inline int established_or_within_budget(const struct endpoint_key *dst, const __u8 *src_addr, __be16 src_port)
{
	__u32 zero = 0;
	struct relay_config *config = bpf_map_lookup_elem(&relay_config_map, &zero);
	if (!config || config->new_flows_per_second == 0)
		return 1;
	struct flow_key flow = { .family = dst->family, .src_port = src_port, .dst_port = dst->port };
	__builtin_memcpy(flow.src_addr, src_addr, sizeof(flow.src_addr));
	if (bpf_map_lookup_elem(&flows, &flow))
		return 1;
	struct flow_budget *budget = bpf_map_lookup_elem(&flow_budget_map, &zero);
	if (!budget)
		return 1;
	__u64 now = bpf_ktime_get_ns();
	__u64 rate = config->new_flows_per_second;
	__u64 capacity = rate * BUDGET_BURST_MS;
	__u64 elapsed_ms = (now - budget->last_ns) / 1000000;
	if (elapsed_ms > 0) {
		__u64 tokens = budget->tokens + elapsed_ms * rate;
		budget->tokens = tokens > capacity ? capacity : tokens;
		budget->last_ns = now;
	}
	if (budget->tokens < 1000)
		return 0;
	budget->tokens -= 1000;
	return 1;
}

/* Redirect to this queue's socket; with no socket the kernel gets the packet (never black-holed). */
static __always_inline int to_socket(struct xdp_md *ctx, __u32 redirect_counter)
{
	int action = bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
	count(action == XDP_REDIRECT ? redirect_counter : XDP_CNT_PASS_NO_SOCKET);
	return action;
}

/* An ICMP error quotes the datagram that caused it: IP header, then at least 8 bytes of UDP.
 * Whether that datagram left from one of the relay's NAT endpoints (its source). */
static __always_inline int quotes_nat_datagram(struct cursor *c, int ipv6)
{
	struct endpoint_key nat = {};
	if (!ipv6) {
		struct iphdr *inner = c->pos;
		if ((void *)(inner + 1) > c->end || inner->ihl != 5 || inner->protocol != IPPROTO_UDP_NUM)
			return 0;
		nat.family = ADDR_FAMILY_IPV4;
		__builtin_memcpy(nat.addr, &inner->saddr, 4);
		c->pos = inner + 1;
	} else {
		struct ipv6hdr *inner = c->pos;
		if ((void *)(inner + 1) > c->end || inner->nexthdr != IPPROTO_UDP_NUM)
			return 0;
		nat.family = ADDR_FAMILY_IPV6;
		__builtin_memcpy(nat.addr, &inner->saddr, 16);
		c->pos = inner + 1;
	}
	struct udphdr *udp = c->pos;
	if ((void *)(udp + 1) > c->end)
		return 0;
	nat.port = udp->source;
	return is_nat(&nat);
}

/* Destination unreachable, time exceeded and (ICMPv6) packet too big: the errors a NAT must
 * carry back. Any other ICMP stays with the kernel. */
static __always_inline int is_icmp_error(__u8 type, int ipv6)
{
	return ipv6 ? (type == 1 || type == 2 || type == 3) : (type == 3 || type == 11);
}

SEC("xdp")
int oxidize_relay(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct endpoint_key dst = {};
	__u8 src_addr[16] = {};
	__u16 ethertype;
	__u32 ip_payload_len;
	int ipv4_options = 0, first_fragment = 0, ipv6_extensions = 0;

	if (!parse_ethhdr(&c, &ethertype))
		return pass(XDP_CNT_PASS_UNPARSED);

	if (ethertype == ETH_P_IP) {
		struct iphdr *ip = parse_iphdr(&c);
		if (!ip)
			return pass(XDP_CNT_PASS_UNPARSED);
		if (ip->protocol == IPPROTO_ICMP_NUM && ip->ihl == 5 && !(bpf_ntohs(ip->frag_off) & IP_MF_AND_OFFSET)) {
			__u8 *icmp = c.pos;
			if ((void *)(icmp + 8) > c.end || !is_icmp_error(icmp[0], 0))
				return pass(XDP_CNT_PASS_NOT_UDP);
			c.pos = icmp + 8;
			return quotes_nat_datagram(&c, 0) ? to_socket(ctx, XDP_CNT_REDIRECT_ICMP) : pass(XDP_CNT_PASS_NOT_UDP);
		}
		if (ip->protocol != IPPROTO_UDP_NUM)
			return pass(XDP_CNT_PASS_NOT_UDP);
		__u16 frag = bpf_ntohs(ip->frag_off);
		/* Later fragments carry no UDP header: the kernel reassembles or discards them. */
		if (frag & IP_OFFSET)
			return pass(XDP_CNT_PASS_UNPARSED);
		first_fragment = (frag & IP_MF_AND_OFFSET) != 0;
		ipv4_options = ip->ihl != 5;
		__u16 total = bpf_ntohs(ip->tot_len);
		ip_payload_len = total > ip->ihl * 4 ? total - ip->ihl * 4 : 0;
		dst.family = ADDR_FAMILY_IPV4;
		__builtin_memcpy(dst.addr, &ip->daddr, 4);
		__builtin_memcpy(src_addr, &ip->saddr, 4);
	} else if (ethertype == ETH_P_IPV6) {
		struct ipv6hdr *ip6 = parse_ipv6hdr(&c);
		if (!ip6)
			return pass(XDP_CNT_PASS_UNPARSED);
		/* Walk extension headers only to tell relay traffic (dropped by name: the relay does not
		 * carry them) from the kernel's. */
		__u8 nexthdr = ip6->nexthdr;
		int fragment = 0;
		void *transport = skip_ipv6_extensions(&c, &nexthdr, &ipv6_extensions, &fragment);
		if (!transport)
			return pass(XDP_CNT_PASS_UNPARSED);
		if (nexthdr == IPPROTO_ICMPV6_NUM && !ipv6_extensions) {
			__u8 *icmp = c.pos;
			if ((void *)(icmp + 8) > c.end || !is_icmp_error(icmp[0], 1))
				return pass(XDP_CNT_PASS_NOT_UDP);
			c.pos = icmp + 8;
			return quotes_nat_datagram(&c, 1) ? to_socket(ctx, XDP_CNT_REDIRECT_ICMP) : pass(XDP_CNT_PASS_NOT_UDP);
		}
		if (nexthdr != IPPROTO_UDP_NUM)
			return pass(XDP_CNT_PASS_NOT_UDP);
		if (fragment == 2)
			return pass(XDP_CNT_PASS_UNPARSED);
		first_fragment = fragment == 1;
		ip_payload_len = bpf_ntohs(ip6->payload_len);
		__u32 walked = transport - (void *)(ip6 + 1);
		ip_payload_len = ip_payload_len > walked ? ip_payload_len - walked : 0;
		dst.family = ADDR_FAMILY_IPV6;
		__builtin_memcpy(dst.addr, &ip6->daddr, 16);
		__builtin_memcpy(src_addr, &ip6->saddr, 16);
	} else {
		return pass(XDP_CNT_PASS_NOT_IP);
	}

	struct udphdr *udp = parse_udphdr(&c);
	if (!udp)
		return pass(XDP_CNT_PASS_UNPARSED);
	dst.port = udp->dest;

	__u32 redirect_counter;
	if (is_nat(&dst))
		redirect_counter = XDP_CNT_REDIRECT_NAT;
	else if (is_listen(&dst))
		redirect_counter = XDP_CNT_REDIRECT_LISTEN;
	else
		return pass(XDP_CNT_PASS_OTHER_PORT);

	/* Relay-bound from here on: malformed packets stop here, counted by reason. */
	if (first_fragment)
		return drop(XDP_CNT_DROP_FRAGMENT);
	if (ipv4_options)
		return drop(XDP_CNT_DROP_IP_OPTIONS);
	if (ipv6_extensions)
		return drop(XDP_CNT_DROP_IPV6_EXTENSION);
	__u32 zero = 0;
	struct relay_config *config = bpf_map_lookup_elem(&relay_config_map, &zero);
	/* The socket would lose it without a trace: the kernel cannot copy it into a frame. */
	if (config && config->max_frame_len && c.end - (void *)(long)ctx->data > config->max_frame_len)
		return drop(XDP_CNT_DROP_TOO_BIG);
	__u16 udp_len = bpf_ntohs(udp->len);
	/* Compared as lengths, not as `udp + udp_len > end`: older verifiers know nothing of a
	 * byte-swapped value's range and refuse pointer arithmetic with it (Debian 12's 6.1 does,
	 * so the relay did not start there; the guest rig in tests/vm boots that kernel). */
	if (udp_len < sizeof(*udp) || udp_len > ip_payload_len || udp_len > c.end - (void *)udp)
		return drop(XDP_CNT_DROP_BAD_UDP_LENGTH);
	if (redirect_counter == XDP_CNT_REDIRECT_LISTEN && !established_or_within_budget(&dst, src_addr, udp->source))
		return drop(XDP_CNT_DROP_NEW_FLOW_BUDGET);

	return to_socket(ctx, redirect_counter);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
