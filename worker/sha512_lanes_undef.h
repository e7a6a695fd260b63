/* Included by sha512_lanes.c after each kernel: forgets the names that kernel defined, so
 * that the next one can define its own. (#undef of a name never defined is harmless.) */
#undef TARGET
#undef V
#undef WIDTH
#undef LOAD
#undef STORE
#undef SET1
#undef CONST
#undef ADD
#undef BSIG0
#undef BSIG1
#undef SSIG0
#undef SSIG1
#undef CH
#undef MAJ
#undef XOR
#undef AND
#undef SHR
#undef SHL
#undef ROR3
#undef ROR8
#undef ROR
#undef XOR3
