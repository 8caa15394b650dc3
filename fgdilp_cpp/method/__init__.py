"""The paper's method as plain functions over tokens and numpy arrays (never imports llama_cpp)."""
