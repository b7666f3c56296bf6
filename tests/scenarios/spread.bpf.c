/* Test rig only: choose a veth's TX queue from the flow hash, as a NIC's RSS would
 * spread flows over its RX queues (a Linux bridge sends everything on one queue). */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

static __u32 (*bpf_get_hash_recalc)(void *skb) = (void *)BPF_FUNC_get_hash_recalc;

__attribute__((section("tc"), used)) int spread(struct __sk_buff *skb)
{
	skb->queue_mapping = bpf_get_hash_recalc(skb) % QUEUES;
	return TC_ACT_OK;
}

__attribute__((section("license"), used)) char LICENSE[] = "GPL";
