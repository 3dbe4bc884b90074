    .code64
    .globl _start
_start:
    mov $1, %al
    out %al, $0x80            # step 1: running 64-bit code with paging
    mov $1, %eax
    mov $4, %ecx
    shlx %rcx, %rax, %rbx     # step 2: BMI2 SHLX
    cmp $16, %rbx
    jne fail
    mov $2, %al
    out %al, $0x80
    lea data(%rip), %rdi      # step 3: CMPXCHG16B
    xor %eax, %eax
    xor %edx, %edx
    mov $5, %ebx
    mov $6, %ecx
    lock cmpxchg16b (%rdi)
    jne fail
    cmpq $5, (%rdi)
    jne fail
    mov $3, %al
    out %al, $0x80
    mov %cr4, %rax            # step 4: XSETBV, XSAVE, XRSTOR
    or $0x40600, %rax         # OSXSAVE | OSFXSR | OSXMMEXCPT
    mov %rax, %cr4
    xor %ecx, %ecx
    mov $3, %eax
    xor %edx, %edx
    xsetbv
    lea xarea(%rip), %rdi
    mov $3, %eax
    xor %edx, %edx
    xsave (%rdi)
    xrstor (%rdi)
    mov $4, %al
    out %al, $0x80
    int3                      # step 5: INT3 through the IDT, handler returns with IRETQ
    mov $5, %al
    out %al, $0x80
    mov $0x4f, %al
    out %al, $0x81            # verdict: OK
    hlt
fail:
    mov $0xee, %al
    out %al, $0x81
    hlt
    .globl handler
handler:
    mov $0x33, %al
    out %al, $0x82            # the #BP handler ran
    iretq
    .balign 16
data:
    .quad 0, 0
    .balign 64
xarea:
