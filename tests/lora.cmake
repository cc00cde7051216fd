# LoRA merged per shard at load (runtime/lora_weights.hpp).
unshard_add_test(test_lora test_lora.cpp)
