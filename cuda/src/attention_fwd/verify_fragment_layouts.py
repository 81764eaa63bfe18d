#!/usr/bin/env python3
"""Host-side check of the forward kernel's fragment index mappings (no GPU needed).

Simulates one warp with the PTX mma fragment layouts (as CuTe encodes them in
cute/atom/mma_traits_sm80.hpp), ldmatrix(.trans) and prmt semantics, and checks that the
kernel's register choices in kernel.h compute the right products:
  - b1 QK^T (m16n8k128 / k256 AND.popc) + the magic-number popcount correction;
  - fp16/bf16 P.V (score C fragments reused as the A fragment, ldmatrix.x4.trans of V);
  - 3xTF32 P.V (key permutation k=t <- key 2t, k=t+4 <- key 2t+1);
  - pv_int8 P.V (keys {2t,2t+1,8+2t,9+2t} per k32 step, byte permutes 0x6420 / 0x7531);
  - the key-tile schedule of FwdBlock::run / process_tile: every valid key is visited, every
    element that needs a mask lies in a masked tile, and skipped n8 blocks hold no valid key.
Run: python3 cuda/src/attention_fwd/verify_fragment_layouts.py  (needs numpy)
"""
import struct

import numpy as np
rng=np.random.default_rng(0)
# ---------- int8 path: one k32 chunk (kc=0), one n16 group, one m16 tile
P=rng.integers(0,256,size=(16,32)).astype(np.int64)   # quantized P (rows x keys)
V=rng.integers(-127,128,size=(32,16)).astype(np.int64) # keys x channels
# score C fragments: s[nb][e] for lane (g,t): row g+8*(e>>1), key nb*8+2t+(e&1)
def s_frag(g,t,nb,e): return P[g+8*(e>>1), nb*8+2*t+(e&1)]
def bytes_word(bs): return sum((int(b)&0xFF)<<(8*i) for i,b in enumerate(bs))
def prmt(a,b,sel):
    src=[(a>>(8*i))&0xFF for i in range(4)]+[(b>>(8*i))&0xFF for i in range(4)]
    return sum(src[(sel>>(4*i))&0xF]<<(8*i) for i in range(4))
# kernel: pa[2*half] = (s[na][0], s[na][1], s[nb][0], s[nb][1]); pa[2*half+1] = same with e 2,3
A_regs={}
for g in range(8):
  for t in range(4):
    regs=[]
    for half in range(2):
      na=2*half; nb=na+1
      regs.append(bytes_word([s_frag(g,t,na,0),s_frag(g,t,na,1),s_frag(g,t,nb,0),s_frag(g,t,nb,1)]))
      regs.append(bytes_word([s_frag(g,t,na,2),s_frag(g,t,na,3),s_frag(g,t,nb,2),s_frag(g,t,nb,3)]))
    A_regs[(g,t)]=regs
# ldmatrix.x4.trans: lane l gives row address key l; matrix i = keys 8i..8i+7; b16 col c = channels 2c,2c+1
def b16(key,col): return (int(V[key,2*col])&0xFF) | ((int(V[key,2*col+1])&0xFF)<<8)
B_even={}; B_odd={}
for g in range(8):
  for t in range(4):
    r=[]
    for i in range(4):
      lo=b16(8*i+2*t,g); hi=b16(8*i+2*t+1,g); r.append(lo|(hi<<16))
    B_even[(g,t)]=[prmt(r[0],r[1],0x6420),prmt(r[2],r[3],0x6420)]
    B_odd[(g,t)]=[prmt(r[0],r[1],0x7531),prmt(r[2],r[3],0x7531)]
def sbyte(x): x&=0xFF; return x-256 if x>=128 else x
def mma_u8s8(Aregs,Bregs):
    # build A[16][32] (u8) and B[32][8] (s8) from per-lane regs using the PTX layouts
    A=np.zeros((16,32),np.int64); B=np.zeros((32,8),np.int64)
    for g in range(8):
      for t in range(4):
        for q in range(4):
          for v in range(4):
            A[g+8*(q&1), 4*t+v+16*(q>>1)] = (Aregs[(g,t)][q]>>(8*v))&0xFF
        for q in range(2):
          for v in range(4):
            B[4*t+v+16*q, g] = sbyte(Bregs[(g,t)][q]>>(8*v))
    return A@B   # 16 x 8
De=mma_u8s8(A_regs,B_even); Do=mma_u8s8(A_regs,B_odd)
truth=P@V
# epilogue: lane (g,t), hr: channels 4t..4t+3 = even[col 2t], odd[col 2t], even[col 2t+1], odd[col 2t+1]
ok=True
for g in range(8):
  for t in range(4):
    for hr in range(2):
      row=g+8*hr
      got=[De[row,2*t],Do[row,2*t],De[row,2*t+1],Do[row,2*t+1]]
      if got!=list(truth[row,4*t:4*t+4]): ok=False
print("int8 P.V permutation:", "OK" if ok else "MISMATCH")
# ---------- tf32 path: one n8 key block, one n8 channel block
P=rng.standard_normal((16,8)); V=rng.standard_normal((8,8))
A=np.zeros((16,8)); B=np.zeros((8,8))
for g in range(8):
  for t in range(4):
    s=[P[g,2*t],P[g,2*t+1],P[g+8,2*t],P[g+8,2*t+1]]  # c0..c3
    a=[s[0],s[2],s[1],s[3]]                         # kernel: pv = {s0, s2, s1, s3}
    # tf32 A layout: a0 (g,t), a1 (g+8,t), a2 (g,t+4), a3 (g+8,t+4)
    A[g,t]=a[0]; A[g+8,t]=a[1]; A[g,t+4]=a[2]; A[g+8,t+4]=a[3]
    # kernel: b0 = V[2t][g], b1 = V[2t+1][g]; tf32 B layout: b0 (k t, n g), b1 (k t+4, n g)
    B[t,g]=V[2*t,g]; B[t+4,g]=V[2*t+1,g]
print("tf32 P.V permutation:", "OK" if np.allclose(A@B,P@V) else "MISMATCH")
# ---------- f16 path: k16 step from two n8 score blocks, ldmatrix.trans V
P=rng.standard_normal((16,16)); V=rng.standard_normal((16,16))
A=np.zeros((16,16)); B0=np.zeros((16,8)); B1=np.zeros((16,8))
for g in range(8):
  for t in range(4):
    s=lambda nb,e: P[g+8*(e>>1), nb*8+2*t+(e&1)]
    pa=[(s(0,0),s(0,1)),(s(0,2),s(0,3)),(s(1,0),s(1,1)),(s(1,2),s(1,3))]
    # f16 A layout: a0 (g,2t..), a1 (g+8,2t..), a2 (g,2t+8..), a3 (g+8,2t+8..)
    A[g,2*t:2*t+2]=pa[0]; A[g+8,2*t:2*t+2]=pa[1]; A[g,2*t+8:2*t+10]=pa[2]; A[g+8,2*t+8:2*t+10]=pa[3]
    # ldmatrix.x4.trans: lane address key=lane&15, col=(lane>>4)*8; matrix i from lanes 8i..: M0 keys0-7 cols0-7,
    # M1 keys 8-15 cols 0-7, M2 keys 0-7 cols 8-15, M3 keys 8-15 cols 8-15; reg_i = (M_i[2t][g], M_i[2t+1][g])
    Ms=[(0,0),(8,0),(0,8),(8,8)]
    r=[(V[k0+2*t,c0+g],V[k0+2*t+1,c0+g]) for (k0,c0) in Ms]
    # B layout: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); block 0 uses r0,r1; block 1 uses r2,r3
    B0[2*t:2*t+2,g]=r[0]; B0[2*t+8:2*t+10,g]=r[1]; B1[2*t:2*t+2,g]=r[2]; B1[2*t+8:2*t+10,g]=r[3]
print("f16 P.V layout:", "OK" if np.allclose(np.hstack([A@B0,A@B1]),P@V) else "MISMATCH")
def f32_from_bits(u): return struct.unpack('<f',struct.pack('<I',u & 0xFFFFFFFF))[0]
ok=True
for d in (8,64,72,128,136,256):
  kw = 4 if d<=128 else 8
  qs=rng.choice([-1,1],size=(16,d)); ks=rng.choice([-1,1],size=(8,d))
  def words(s):
    w=[0]*8
    for c in range(d):
      if s[c]>0: w[c//32]|=1<<(c%32)
    return w
  Qw=[words(qs[r]) for r in range(16)]; Kw=[words(ks[n]) for n in range(8)]
  # kernel: qa0 = row g word t, qa1 = row g+8 word t, qa2 = row g word t+4, qa3 = row g+8 word t+4
  # k128 A layout: a0 row g bits [32t..], a1 row g+8; B b0 col g bits [32t..]; k256 adds a2/a3/b1 at +128
  # emulate the mma: scatter every lane's registers to (row, k) / (k, col) bits, then multiply
  Abits=np.zeros((16,256),np.int64); Bbits=np.zeros((256,8),np.int64)
  for g in range(8):
    for t in range(4):
      a=[Qw[g][t],Qw[g+8][t],Qw[g][t+4],Qw[g+8][t+4]]; b=[Kw[g][t],Kw[g][t+4]]
      for v in range(32):
        Abits[g,32*t+v]=(a[0]>>v)&1; Abits[g+8,32*t+v]=(a[1]>>v)&1
        Bbits[32*t+v,g]=(b[0]>>v)&1
        if kw==8:
          Abits[g,128+32*t+v]=(a[2]>>v)&1; Abits[g+8,128+32*t+v]=(a[3]>>v)&1; Bbits[128+32*t+v,g]=(b[1]>>v)&1
  r=Abits@Bbits
  for i in range(16):
    pa=sum(bin(w).count('1') for w in Qw[i])
    rowc=0x4B400000 + d - 2*pa
    for j in range(8):
      pb=sum(bin(w).count('1') for w in Kw[j])
      colc=np.float32(-(12582912.0+2.0*pb))
      y=np.float32(f32_from_bits(int(r[i,j])*4+rowc))+colc
      if y!=int(qs[i]@ks[j]): ok=False; print("bad",d,i,j,y,qs[i]@ks[j])
print("b1 QK fragments + popcount correction:", "OK" if ok else "MISMATCH")

# ---------- key-tile schedule (n_tiles, first_masked, warp_limit) over many shapes
def cdiv(a,b): return (a+b-1)//b
bad=0
for (warps,mt,bn) in [(4,2,64),(4,2,32),(8,1,64),(8,1,32),(8,1,16),(4,1,32)]:
  BM=warps*16*mt
  for Nq in [1,5,63,64,65,127,128,129,200,300,513]:
    for Nk in [0,1,5,31,32,33,63,64,65,100,129,300,513]:
      for causal in (False,True):
        nmb=cdiv(Nq,BM)
        for mb in range(nmb):
          m0=mb*BM
          n_tiles=cdiv(Nk,bn)
          if causal: n_tiles=min(n_tiles,cdiv(min(Nq,m0+BM),bn))
          first=n_tiles
          if Nk%bn: first=min(first,Nk//bn)
          if causal: first=min(first,m0//bn)
          visited=set(range(n_tiles))
          for i in range(m0,min(Nq,m0+BM)):
            w=(i-m0)//(16*mt)
            for j in range(Nk):
              valid = (not causal) or j<=i
              n=j//bn
              if valid and n not in visited: bad+=1; print("valid key not visited",Nq,Nk,causal,i,j)
          for n in visited:
            masked_tile = n>=first
            key0=n*bn
            for w in range(warps):
              wr0=m0+w*16*mt
              limit=bn
              if masked_tile:
                limit=Nk-key0
                if causal: limit=min(limit,wr0+16*mt-key0)
              for i in range(wr0,wr0+16*mt):
                if i>=Nq: continue
                for jj in range(bn):
                  j=key0+jj
                  need_mask = j>=Nk or (causal and j>i)
                  if need_mask and not masked_tile: bad+=1; print("unmasked tile has masked element",Nq,Nk,causal,i,j,bn,BM)
                  skipped = masked_tile and (jj//8)*8>=limit
                  if skipped and not need_mask: bad+=1; print("skipped a valid element",Nq,Nk,causal,i,j)
print("schedule check:", "OK" if bad==0 else f"{bad} problems")
