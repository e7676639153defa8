#pragma once
// vkvlm's C++ API: run vision-language models on any Vulkan device, on a device vkvlm creates or
// on the application's own.
//
//   auto ctx = std::make_unique<vkvlm::gpu::Context>(vkvlm::gpu::Device::create());
//   vkvlm::Model model(*ctx, "path/to/llava-1.5-7b-hf");
//   vkvlm::Session session(model, 4096);
//   auto image = vkvlm::load_image_file("photo.jpg");
//   vkvlm::Messages messages = vkvlm::Messages::parse(R"([{"role": "user", "content":
//       [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}])");
//   auto result = session.generate(model.build_prompt(messages, {image}), {},
//       [](const vkvlm::StepOutput& step) { std::cout << step.text << std::flush; return true; });
//
// To run on the application's device instead, fill a vkvlm::gpu::AdoptedDevice (instance,
// physical device, device, queue family and index, and the feature chain it was created with)
// and pass vkvlm::gpu::Device::adopt(adopted) to the Context: vkvlm then creates and destroys
// none of those objects.
#include "gpu/context.h"
#include "gpu/device.h"
#include "gpu/error.h"
#include "gpu/ops.h"
#include "gpu/recorder.h"
#include "host/image.h"
#include "host/tokenizer.h"
#include "models/model.h"
