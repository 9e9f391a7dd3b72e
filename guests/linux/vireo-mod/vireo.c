// SPDX-License-Identifier: GPL-2.0
/*
 * vireo.ko: Vireo's exit statistics in sysfs, for shell scripts in a Linux guest.
 *
 * It speaks Vireo's own hypercall ABI, version 0.2 (guest-abi/src/ in the Vireo repository
 * is the definition): it finds Vireo through CPUID, asks for the hypercall page, and then
 * answers reads of /sys/hypervisor/vireo/... with the STATS, STEAL_TIME and VCPU_INFO calls.
 * Layout and meaning of the files: guests/linux/README.md.
 *
 * Anywhere else (no hypervisor, another hypervisor, an older Vireo) loading fails with
 * -ENODEV and one "vireo: absent reason=..." line in the kernel log, so that one initramfs
 * serves both native and Vireo boots.
 */
#define pr_fmt(fmt) "vireo: " fmt

#include <linux/errno.h>
#include <linux/gfp.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/vmalloc.h>
#include <asm/asm.h>
#include <asm/io.h>
#include <asm/msr.h>
#include <asm/nospec-branch.h>
#include <asm/processor.h>

/* --- The ABI (guest-abi/src/{cpuid,hypercall,stats}.rs) ------------------------------------ */

#define VIREO_CPUID_FIRST	0x40000000u
#define VIREO_CPUID_LAST	0x4000ff00u
#define VIREO_CPUID_STEP	0x100u
#define VIREO_HV_PRESENT	(1u << 31)	/* CPUID.1:ECX */
#define VIREO_SIGNATURE		"VireoVireoHV"

#define VIREO_ABI_MAJOR		0
#define VIREO_ABI_MINOR_MIN	2

#define VIREO_FEAT_HYPERCALL_PAGE	(1u << 2)
#define VIREO_FEAT_STATS		(1u << 3)

#define VIREO_HC_BASE		0x56490000u
#define VIREO_HC_VERSION	1
#define VIREO_HC_FEATURES	5
#define VIREO_HC_STATS		6
#define VIREO_HC_STATS_MARK	7
#define VIREO_HC_STEAL_TIME	8
#define VIREO_HC_VCPU_INFO	9
#define VIREO_HC_LAST_USED	VIREO_HC_VCPU_INFO

#define VIREO_PAGE_ENABLE	1ull

#define VIREO_SCOPE_SELF	(~0ull)
#define VIREO_SCOPE_VM		(~0ull - 1)
#define VIREO_STATS_SINCE_MARK	1ull

#define VIREO_STATS_MAGIC	0x41545356u	/* "VSTA" little-endian */
#define VIREO_STATS_LAYOUT	1
#define VIREO_STATS_HEADER	48
#define VIREO_STATS_RECORD	16

struct vireo_stats_header {
	u32 magic;
	u32 version;
	u32 kinds;
	u32 vcpus;
	u64 tsc_khz;
	u64 now_tsc;
	u64 since_tsc;
	u64 steal_ns;
} __packed;

struct vireo_exit_record {
	u64 count;
	u64 cycles;
} __packed;

static_assert(sizeof(struct vireo_stats_header) == VIREO_STATS_HEADER);
static_assert(sizeof(struct vireo_exit_record) == VIREO_STATS_RECORD);

/* guest_abi::stats::KIND_NAMES, in record order; Vireo only ever appends. */
static const char *const vireo_kind_names[] = {
	"cpuid", "rdmsr", "wrmsr", "io", "hypercall", "hlt", "xsetbv", "npf", "exception",
	"triple_fault", "external_interrupt", "interrupt_window", "nmi", "init", "sipi",
	"pause", "entry_failed", "unhandled", "cr_access",
};

/*
 * The STATS buffer: 1 KiB holds the header and 61 records (Vireo has 19 kinds today).
 * kmalloc() gives a 1 KiB object 1 KiB-aligned, so it never crosses a page boundary and
 * Vireo sees one contiguous guest-physical range.
 */
#define VIREO_STATS_BUF		1024

/* --- State ---------------------------------------------------------------------------------- */

static u32 vireo_base;		/* CPUID base of Vireo's leaves (0x40000100 today) */
static u32 vireo_abi;		/* major << 16 | minor */
static u32 vireo_features;	/* CPUID base+1 EBX */
static u32 vireo_page_msr;
static u32 vireo_stub_size;
static unsigned int vireo_vcpus;

static void *vireo_hc_va;	/* vireo_hc_area while Vireo's stubs are in it, else NULL */
static int vireo_hc_cpu;	/* where the MSR was written: where it is written back to 0 */

/*
 * The hypercall page must be executable, and a module cannot make kernel memory executable:
 * this kernel exports neither set_memory_x() nor __vmalloc_node_range() nor module_alloc(),
 * and vmap() always maps non-executable (it applies pgprot_nx() to what it is given; an
 * earlier version of this module learnt that from an NX fault). The module's own text is
 * executable, though: this page-aligned page of INT3 (0xCC) bytes sits in a text section of
 * its own, which the module loader places at its alignment and maps read-only and
 * executable like the rest of the text. The guest never writes it; Vireo fills it through
 * its guest-physical address, which bypasses the guest's page tables. Objtool decodes it as
 * INT3 traps, which it accepts outside functions; an unfilled stub traps instead of running
 * garbage.
 */
asm(".pushsection .text.vireo_hypercall_page, \"ax\", @progbits\n"
    ".balign 4096\n"
    "vireo_hc_area:\n"
    ".fill 4096, 1, 0xcc\n"
    ".popsection\n");
extern const u8 vireo_hc_area[PAGE_SIZE];
static_assert(PAGE_SIZE == 4096);

/* One STATS buffer for every reader: readers take turns (a read is one hypercall). */
static DEFINE_MUTEX(vireo_stats_lock);
static void *vireo_stats_buf;

/* --- Hypercalls ------------------------------------------------------------------------------ */

/*
 * Calls stub nr of the hypercall page: arguments in RBX, RCX, RDX, RSI, result in RAX; the
 * stub clobbers nothing else. The call goes through a register with CALL_NOSPEC (what the
 * kernel's own Hyper-V and Xen hypercall pages use): in this retpoline kernel it becomes a
 * call through the retpoline thunk (or a plain call that objtool accepts as annotated), so
 * objtool does not reject a bare indirect call. ASM_CALL_CONSTRAINT tells the compiler that
 * the asm calls a function, so the stack frame is set up first. The stub's own RET is not
 * a return thunk, like those pages'. IBT (which would want an ENDBR64 at the target) is off
 * in Debian's 6.1 config. "memory": Vireo reads and writes guest memory (the STATS buffer).
 */
static long vireo_hypercall(unsigned int nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
	void *stub = vireo_hc_va + nr * vireo_stub_size;
	long ret;

	asm volatile(CALL_NOSPEC
		     : "=a" (ret), ASM_CALL_CONSTRAINT
		     : "b" (a0), "c" (a1), "d" (a2), "S" (a3), THUNK_TARGET(stub)
		     : "cc", "memory");
	return ret;
}

/* --- Detection and the hypercall page --------------------------------------------------------- */

/* The reason is one word for scripts (init-headless.sh prints it), the rest for people. */
#define vireo_absent(reason, fmt, ...) \
	pr_info("absent reason=" reason " (" fmt ")\n", ##__VA_ARGS__)

static int vireo_detect(void)
{
	u32 eax, ebx, ecx, edx, base;
	char sig[13];

	if (!(cpuid_ecx(1) & VIREO_HV_PRESENT)) {
		vireo_absent("no-hypervisor", "CPUID.1:ECX[31] clear");
		return -ENODEV;
	}
	/* Another hypervisor's signature (KVM's, which Vireo can offer too) may come first. */
	for (base = VIREO_CPUID_FIRST; base <= VIREO_CPUID_LAST; base += VIREO_CPUID_STEP) {
		cpuid(base, &eax, &ebx, &ecx, &edx);
		memcpy(sig, &ebx, 4);
		memcpy(sig + 4, &ecx, 4);
		memcpy(sig + 8, &edx, 4);
		sig[12] = '\0';
		if (!memcmp(sig, VIREO_SIGNATURE, 12))
			break;
	}
	if (base > VIREO_CPUID_LAST) {
		vireo_absent("not-vireo", "no VireoVireoHV signature in CPUID 0x40000000-0x4000ff00");
		return -ENODEV;
	}
	vireo_base = base;
	if (eax < base + 2) {
		vireo_absent("abi-too-old", "highest Vireo leaf %#x, no hypercall page leaf", eax);
		return -ENODEV;
	}

	cpuid(base + 1, &eax, &ebx, &ecx, &edx);
	vireo_abi = eax;
	vireo_features = ebx;
	if (eax >> 16 != VIREO_ABI_MAJOR || (eax & 0xffff) < VIREO_ABI_MINOR_MIN) {
		vireo_absent("abi-too-old", "Vireo ABI %u.%u, this module needs %u.%u or a later 0.x",
			     eax >> 16, eax & 0xffff, VIREO_ABI_MAJOR, VIREO_ABI_MINOR_MIN);
		return -ENODEV;
	}
	if (!(ebx & VIREO_FEAT_HYPERCALL_PAGE) || !(ebx & VIREO_FEAT_STATS)) {
		vireo_absent("no-stats", "features %#x lack the hypercall page (bit 2) or STATS (bit 3)", ebx);
		return -ENODEV;
	}

	cpuid(base + 2, &eax, &ebx, &ecx, &edx);
	vireo_page_msr = eax;
	vireo_stub_size = ebx;
	/* Each stub is at least its 9 bytes of code; the stubs must fit in the page. */
	if (!eax || ebx < 9 || ecx <= VIREO_HC_LAST_USED || (u64)ebx * ecx > PAGE_SIZE) {
		vireo_absent("bad-page-leaf", "MSR %#x, stub size %u, stubs %u", eax, ebx, ecx);
		return -ENODEV;
	}
	return 0;
}

/* Whether stub nr of the filled page starts with "mov eax, BASE + nr" (B8 imm32). */
static bool vireo_stub_ok(unsigned int nr)
{
	const u8 *s = vireo_hc_va + nr * vireo_stub_size;
	u32 imm;

	memcpy(&imm, s + 1, 4);
	return s[0] == 0xb8 && imm == VIREO_HC_BASE + nr;
}

static void vireo_page_disable(void)
{
	/*
	 * Back to 0 on the CPU that enabled it, in case Vireo keeps the MSR per vCPU. After
	 * this Vireo no longer writes the page, so it can be freed.
	 */
	wrmsr_safe_on_cpu(vireo_hc_cpu, vireo_page_msr, 0, 0);
	vireo_hc_va = NULL;
}

static int vireo_page_enable(void)
{
	static const unsigned int used[] = {
		VIREO_HC_VERSION, VIREO_HC_FEATURES, VIREO_HC_STATS, VIREO_HC_STATS_MARK,
		VIREO_HC_STEAL_TIME, VIREO_HC_VCPU_INFO,
	};
	u64 gpa;
	long ret;
	int i, err;

	/* Module text lies in vmalloc space: its physical page comes from the page tables. */
	if (!IS_ALIGNED((unsigned long)vireo_hc_area, PAGE_SIZE)) {
		vireo_absent("page-not-aligned", "the hypercall page at %px is not page-aligned", vireo_hc_area);
		return -ENODEV;
	}
	gpa = page_to_phys(vmalloc_to_page(vireo_hc_area));
	vireo_hc_cpu = get_cpu();
	err = wrmsrl_safe(vireo_page_msr, gpa | VIREO_PAGE_ENABLE);
	put_cpu();
	if (err) {
		vireo_absent("page-refused", "writing %#llx to MSR %#x faulted", gpa | 1, vireo_page_msr);
		return -ENODEV;
	}
	vireo_hc_va = (void *)vireo_hc_area;

	/* Never jump into a page Vireo did not fill (zeros would run as ADD [RAX], AL). */
	for (i = 0; i < ARRAY_SIZE(used); i++) {
		if (!vireo_stub_ok(used[i])) {
			vireo_absent("page-not-filled", "stub %u of the hypercall page at %#llx is not Vireo's",
				     used[i], gpa);
			vireo_page_disable();
			return -ENODEV;
		}
	}

	ret = vireo_hypercall(VIREO_HC_VERSION, 0, 0, 0, 0);
	if (ret != vireo_abi) {
		vireo_absent("version-mismatch", "VERSION says %#lx, CPUID %#x", ret, vireo_abi);
		vireo_page_disable();
		return -ENODEV;
	}
	ret = vireo_hypercall(VIREO_HC_FEATURES, 0, 0, 0, 0);
	if (ret < 0 || (u32)ret != vireo_features) {
		vireo_absent("version-mismatch", "FEATURES says %#lx, CPUID %#x", ret, vireo_features);
		vireo_page_disable();
		return -ENODEV;
	}
	ret = vireo_hypercall(VIREO_HC_VCPU_INFO, 0, 0, 0, 0);
	if (ret < 0 || !((ret >> 16) & 0xffff)) {
		vireo_absent("vcpu-info-failed", "VCPU_INFO returned %ld", ret);
		vireo_page_disable();
		return -ENODEV;
	}
	vireo_vcpus = (ret >> 16) & 0xffff;
	return 0;
}

/* --- Formatting ------------------------------------------------------------------------------ */

/*
 * Appends one "name count cycles" line per exit kind with a non-zero count of scope/flags to
 * buf (a sysfs page) at *at. The caller holds vireo_stats_lock. Kinds newer than this module
 * are named kindN.
 */
static int vireo_format_exits(char *buf, int *at, u64 scope, u64 flags, struct vireo_stats_header *hdr)
{
	const struct vireo_exit_record *rec = vireo_stats_buf + VIREO_STATS_HEADER;
	long ret;
	u32 i, n;

	ret = vireo_hypercall(VIREO_HC_STATS, virt_to_phys(vireo_stats_buf), VIREO_STATS_BUF, scope, flags);
	if (ret < 0)
		return ret;
	if (ret < VIREO_STATS_HEADER || ret > VIREO_STATS_BUF)
		return -EIO;
	memcpy(hdr, vireo_stats_buf, sizeof(*hdr));
	if (hdr->magic != VIREO_STATS_MAGIC || hdr->version != VIREO_STATS_LAYOUT)
		return -EIO;
	n = min_t(u32, hdr->kinds, (ret - VIREO_STATS_HEADER) / VIREO_STATS_RECORD);
	if (!buf)
		return 0;
	for (i = 0; i < n; i++) {
		if (!rec[i].count)
			continue;
		if (i < ARRAY_SIZE(vireo_kind_names))
			*at += sysfs_emit_at(buf, *at, "%s %llu %llu\n", vireo_kind_names[i],
					     rec[i].count, rec[i].cycles);
		else
			*at += sysfs_emit_at(buf, *at, "kind%u %llu %llu\n", i, rec[i].count, rec[i].cycles);
	}
	return 0;
}

static ssize_t vireo_show_exits(char *buf, u64 scope, u64 flags)
{
	struct vireo_stats_header hdr;
	int at = 0, err;

	mutex_lock(&vireo_stats_lock);
	err = vireo_format_exits(buf, &at, scope, flags, &hdr);
	mutex_unlock(&vireo_stats_lock);
	return err ? err : at;
}

static ssize_t vireo_show_steal(char *buf, u64 scope)
{
	long ret = vireo_hypercall(VIREO_HC_STEAL_TIME, scope, 0, 0, 0);

	if (ret < 0)
		return ret;
	return sysfs_emit(buf, "%ld\n", ret);
}

/* --- /sys/hypervisor/vireo/ -------------------------------------------------------------------- */

static ssize_t abi_version_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u.%u\n", vireo_abi >> 16, vireo_abi & 0xffff);
}

static ssize_t features_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "0x%x\n", vireo_features);
}

static ssize_t vcpus_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", vireo_vcpus);
}

static ssize_t tsc_khz_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct vireo_stats_header hdr;
	int err;

	mutex_lock(&vireo_stats_lock);
	err = vireo_format_exits(NULL, NULL, VIREO_SCOPE_VM, 0, &hdr);
	mutex_unlock(&vireo_stats_lock);
	return err ? err : sysfs_emit(buf, "%llu\n", hdr.tsc_khz);
}

static ssize_t exits_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return vireo_show_exits(buf, VIREO_SCOPE_VM, 0);
}

static ssize_t exits_since_mark_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return vireo_show_exits(buf, VIREO_SCOPE_VM, VIREO_STATS_SINCE_MARK);
}

static ssize_t mark_store(struct kobject *kobj, struct kobj_attribute *attr, const char *buf, size_t len)
{
	long ret = vireo_hypercall(VIREO_HC_STATS_MARK, VIREO_SCOPE_VM, 0, 0, 0);

	return ret < 0 ? ret : len;
}

static ssize_t steal_ns_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return vireo_show_steal(buf, VIREO_SCOPE_VM);
}

static struct kobj_attribute vireo_attr_abi_version = __ATTR_RO(abi_version);
static struct kobj_attribute vireo_attr_features = __ATTR_RO(features);
static struct kobj_attribute vireo_attr_vcpus = __ATTR_RO(vcpus);
static struct kobj_attribute vireo_attr_tsc_khz = __ATTR_RO(tsc_khz);
static struct kobj_attribute vireo_attr_exits = __ATTR_RO(exits);
static struct kobj_attribute vireo_attr_exits_since_mark = __ATTR_RO(exits_since_mark);
static struct kobj_attribute vireo_attr_mark = __ATTR_WO(mark);
static struct kobj_attribute vireo_attr_steal_ns = __ATTR_RO(steal_ns);

static struct attribute *vireo_attrs[] = {
	&vireo_attr_abi_version.attr,
	&vireo_attr_features.attr,
	&vireo_attr_vcpus.attr,
	&vireo_attr_tsc_khz.attr,
	&vireo_attr_exits.attr,
	&vireo_attr_exits_since_mark.attr,
	&vireo_attr_mark.attr,
	&vireo_attr_steal_ns.attr,
	NULL,
};

static const struct attribute_group vireo_group = {
	.attrs = vireo_attrs,
};

/* --- /sys/hypervisor/vireo/vcpuN/ -------------------------------------------------------------- */

/* A kobject of its own per vCPU, so that the show functions know their vCPU's index. */
struct vireo_vcpu {
	struct kobject kobj;
	unsigned int index;
};

#define to_vireo_vcpu(k) container_of(k, struct vireo_vcpu, kobj)

static ssize_t vcpu_exits_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return vireo_show_exits(buf, to_vireo_vcpu(kobj)->index, 0);
}

static ssize_t vcpu_steal_ns_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return vireo_show_steal(buf, to_vireo_vcpu(kobj)->index);
}

static struct kobj_attribute vireo_vcpu_attr_exits = __ATTR(exits, 0444, vcpu_exits_show, NULL);
static struct kobj_attribute vireo_vcpu_attr_steal_ns = __ATTR(steal_ns, 0444, vcpu_steal_ns_show, NULL);

static struct attribute *vireo_vcpu_attrs[] = {
	&vireo_vcpu_attr_exits.attr,
	&vireo_vcpu_attr_steal_ns.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vireo_vcpu);

static void vireo_vcpu_release(struct kobject *kobj)
{
	kfree(to_vireo_vcpu(kobj));
}

static struct kobj_type vireo_vcpu_ktype = {
	.release = vireo_vcpu_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = vireo_vcpu_groups,
};

static struct kobject *vireo_kobj;
static struct vireo_vcpu **vireo_vcpu_objs;

static void vireo_sysfs_remove(void)
{
	unsigned int i;

	/* Removal waits for reads in progress, so no hypercall runs after this. */
	if (vireo_vcpu_objs) {
		for (i = 0; i < vireo_vcpus; i++)
			if (vireo_vcpu_objs[i])
				kobject_put(&vireo_vcpu_objs[i]->kobj);
		kfree(vireo_vcpu_objs);
		vireo_vcpu_objs = NULL;
	}
	if (vireo_kobj) {
		sysfs_remove_group(vireo_kobj, &vireo_group);
		kobject_put(vireo_kobj);
		vireo_kobj = NULL;
	}
}

static int vireo_sysfs_add(void)
{
	/* /sys/hypervisor exists with CONFIG_SYS_HYPERVISOR (Debian: =y); else /sys/kernel. */
	struct kobject *parent = hypervisor_kobj ? hypervisor_kobj : kernel_kobj;
	unsigned int i;
	int err;

	vireo_kobj = kobject_create_and_add("vireo", parent);
	if (!vireo_kobj)
		return -ENOMEM;
	err = sysfs_create_group(vireo_kobj, &vireo_group);
	if (err) {
		kobject_put(vireo_kobj);
		vireo_kobj = NULL;
		return err;
	}
	vireo_vcpu_objs = kcalloc(vireo_vcpus, sizeof(*vireo_vcpu_objs), GFP_KERNEL);
	if (!vireo_vcpu_objs)
		goto nomem;
	for (i = 0; i < vireo_vcpus; i++) {
		struct vireo_vcpu *v = kzalloc(sizeof(*v), GFP_KERNEL);

		if (!v)
			goto nomem;
		v->index = i;
		err = kobject_init_and_add(&v->kobj, &vireo_vcpu_ktype, vireo_kobj, "vcpu%u", i);
		if (err) {
			/* kobject_init_and_add() initialised it: put, not kfree. */
			kobject_put(&v->kobj);
			vireo_sysfs_remove();
			return err;
		}
		vireo_vcpu_objs[i] = v;
	}
	return 0;
nomem:
	vireo_sysfs_remove();
	return -ENOMEM;
}

/* --- Module ---------------------------------------------------------------------------------- */

static int __init vireo_init(void)
{
	int err;

	err = vireo_detect();
	if (err)
		return err;
	vireo_stats_buf = kmalloc(VIREO_STATS_BUF, GFP_KERNEL);
	if (!vireo_stats_buf)
		return -ENOMEM;
	err = vireo_page_enable();
	if (err)
		goto free_buf;
	err = vireo_sysfs_add();
	if (err) {
		pr_err("cannot create the sysfs files: %d\n", err);
		goto disable;
	}
	pr_info("loaded: ABI %u.%u, features %#x, %u vCPU(s), CPUID base %#x, hypercall page at %#llx\n",
		vireo_abi >> 16, vireo_abi & 0xffff, vireo_features, vireo_vcpus, vireo_base,
		(u64)page_to_phys(vmalloc_to_page(vireo_hc_area)));
	return 0;

disable:
	vireo_page_disable();
free_buf:
	kfree(vireo_stats_buf);
	vireo_stats_buf = NULL;
	return err;
}

static void __exit vireo_exit(void)
{
	vireo_sysfs_remove();
	vireo_page_disable();
	kfree(vireo_stats_buf);
}

module_init(vireo_init);
module_exit(vireo_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("The Vireo authors");
MODULE_DESCRIPTION("Vireo hypervisor statistics in /sys/hypervisor/vireo (hypercall ABI 0.2)");
